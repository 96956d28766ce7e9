from koupleless.kube.workqueue import Handler, WorkQueue  # noqa: F401  moved to koupleless/kube/workqueue.py
