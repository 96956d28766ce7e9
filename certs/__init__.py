"""Certificates: a CA and serving/client certificates (cryptography), CA-bundle injection."""
