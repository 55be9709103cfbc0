"""The parts that live as long as the app: built from the settings around one backend, started and
stopped by the app's lifespan. Routes reach them through :mod:`gateway.api.deps`.

A start first queues the webhooks of jobs that ended just before the last stop. Jobs left running by a
gateway that died are re-queued by the worker once their lease runs out (:mod:`gateway.store`).
"""

from __future__ import annotations

from gateway.backends.base import JobBackend
from gateway.backends.served import ServedWeights
from gateway.core.auth import ApiKeys
from gateway.core.metrics import Metrics
from gateway.core.settings import GatewaySettings
from gateway.jobs.batches import BatchService
from gateway.jobs.estimates import Estimator
from gateway.jobs.quotas import Quotas
from gateway.jobs.service import JobService
from gateway.jobs.storage import DataDir
from gateway.jobs.worker import Worker
from gateway.store import open_store
from gateway.webhooks.delivery import Webhooks
from gateway.webhooks.signing import Signer, load_secret
from gateway.webhooks.targets import AddressPolicy
from lipsync.media import MediaSettings


class Runtime:
    def __init__(self, settings: GatewaySettings, keys: ApiKeys, backend: JobBackend) -> None:
        self.settings = settings
        self.keys = keys
        self.backend = backend
        self.data = DataDir(settings.data_dir, settings.min_free_mb)
        self.store = open_store(
            settings.database,
            self.data.database,
            settings.lease_s,
            settings.queue_policy,
            settings.position_ttl_s,
            settings.database_pool_size,
        )
        self.quotas = Quotas(settings, self.store)
        self.metrics = Metrics(self.store)
        self.weights = ServedWeights(backend)
        self.webhooks = Webhooks(
            self.store,
            settings,
            Signer(load_secret(settings.webhook_secret_env, settings.webhook_secret_path)),
            AddressPolicy(settings.webhook_allow),
        )
        self.jobs = JobService(
            settings,
            keys,
            MediaSettings.load(),
            self.data,
            self.store,
            self.quotas,
            self.metrics,
            self.webhooks,
            self.weights,
            on_queued=lambda: self.worker.wake(),  # noqa: PLW0108 - the worker is made next: it calls back into jobs
            on_batch_job_ended=lambda batch_id: self.batches.job_ended(batch_id),  # noqa: PLW0108 - made next, too
        )
        self.batches = BatchService(self.jobs)
        self.estimator = Estimator(settings, self.store, self.weights, self.jobs.media)
        self.worker = Worker(settings, self.store, self.data, self.metrics, backend, self.jobs.notify)

    def start(self) -> None:
        for job_id in self.store.unnotified():  # ended just before the last stop, webhook not yet queued
            self.jobs.notify(job_id)
        self.batches.settle()
        self.webhooks.start()
        self.worker.start()
        self.weights.start()

    def stop(self) -> None:
        self.weights.stop()
        self.worker.stop()
        self.webhooks.close()
        self.store.close()
