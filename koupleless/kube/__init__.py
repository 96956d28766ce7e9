"""The kube layer every server shares: kubeconfig loading, an asyncio REST client over plain dicts,
informers (list + watch + local store) and an Event recorder."""

from koupleless.kube.client import (
    ApiError,
    KubeClient,
    LineSplitter,
    WatchDecodeError,
    event_path,
    lease_path,
    namespace_path,
    node_path,
    pod_path,
    resource_path,
)
from koupleless.kube.config import KubeConfig, KubeConfigError, load_config
from koupleless.kube.events import EventRecorder
from koupleless.kube.informer import Informer, Store, object_key

__all__ = [
    "ApiError",
    "EventRecorder",
    "Informer",
    "KubeClient",
    "KubeConfig",
    "KubeConfigError",
    "LineSplitter",
    "Store",
    "WatchDecodeError",
    "event_path",
    "lease_path",
    "load_config",
    "namespace_path",
    "node_path",
    "object_key",
    "pod_path",
    "resource_path",
]
