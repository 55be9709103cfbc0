"""Webhooks on their own: the URL and address rules (every spelling of an internal address), the
allowlist, signing and its secret, the outbox table, and the delivery loop against real local HTTP
receivers (deadline per attempt, per-owner cap, back-off, restart, checking the address at delivery).
Jobs on Triton through the gateway process are in test_gateway_webhooks.py."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook
from support.gateway_process import HOOK_HOST
from support.webhook_receivers import TRICKLE, Receiver

from gateway.core.settings import GatewaySettings
from gateway.store import JobStore, new_job_id, sqlite_url
from gateway.webhooks.delivery import Webhooks, backoff_s
from gateway.webhooks.signing import SecretError, Signer, load_secret, new_secret
from gateway.webhooks.targets import (
    AddressPolicy,
    WebhookRefused,
    forbidden_kind,
    numeric_host,
    parse_target,
)

REFUSED = {
    # the adversarial test's targets
    "http://169.254.169.254/latest/meta-data/": "link-local",
    "http://10.0.0.1/": "private",
    "http://[fd00::1]/": "private",
    "http://[::1]/": "loopback",
    "http://0.0.0.0:8080/": "unspecified",
    "http://2130706433/": "loopback",
    "http://localhost:9000/": "loopback",
    # other spellings of loopback and metadata addresses
    "http://127.0.0.1/": "loopback",
    "http://127.1/": "loopback",
    "http://0x7f000001/": "loopback",
    "http://0x7f.1/": "loopback",
    "http://0177.0.0.1/": "loopback",
    "http://017700000001/": "loopback",
    "http://0x7F.0.0.0x1/": "loopback",
    "http://0/": "unspecified",
    "http://LOCALHOST./": "loopback",
    "http://[::ffff:127.0.0.1]/": "loopback",
    "http://[::ffff:7f00:1]/": "loopback",
    "http://[0:0:0:0:0:ffff:a9fe:a9fe]/": "link-local",
    "http://[64:ff9b::a9fe:a9fe]/": "link-local",  # NAT64 of 169.254.169.254
    "http://[2002:a00:1::]/": "private",  # 6to4 of 10.0.0.1
    "http://[::]/": "unspecified",
    "http://[::127.0.0.1]/": "reserved",
    "http://[fe80::1%25eth0]/": "link-local",
    "http://[fd00:ec2::254]/": "private",
    "http://[ff02::1]/": "multicast",
    "http://[2001:db8::1]/": "private",
    "http://172.16.0.1/": "private",
    "http://192.168.1.1/": "private",
    "http://100.100.100.200/": "non-public",  # shared address space (CGNAT), a cloud metadata address
    "http://224.0.0.1/": "multicast",
    "http://240.0.0.1/": "private",
    "http://255.255.255.255/": "private",
    "http://198.18.0.1/": "private",
    # not globally reachable though this Python's ipaddress calls them global
    "http://192.0.0.8/": "non-public",
    "http://192.0.0.9/": "non-public",
    "http://[fec0::1]/": "non-public",
    "http://[2002:c000:8::]/": "non-public",  # 6to4 of 192.0.0.8
}


@pytest.mark.parametrize("url", REFUSED)
def test_internal_addresses_are_refused_in_every_spelling(url: str) -> None:
    with pytest.raises(WebhookRefused, match=REFUSED[url]):
        AddressPolicy().destination(url)


@pytest.mark.parametrize(
    "url", ["http://u:p@8.8.8.8/", "http://u@8.8.8.8/", "http://:@8.8.8.8/", "ftp://8.8.8.8/", "file:///etc/passwd",
            "http:///path", "http://1.2.3.4.5/", "http://08/", "http://[::1/", "http://8.8.8.8:99999/", "http://bücher.de/"],
)
def test_credentials_other_schemes_and_malformed_hosts_are_refused(url: str) -> None:
    with pytest.raises(WebhookRefused):
        AddressPolicy().destination(url)


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "017700000001", "127.0.1", "127.0.0.1"])
def test_numeric_hosts_are_read_like_url_parsers_and_inet_aton_read_them(host: str) -> None:
    assert numeric_host(host) == ipaddress.IPv4Address("127.0.0.1")


def test_public_addresses_pass_and_are_connected_to_with_the_urls_host() -> None:
    v4 = AddressPolicy().destination("http://8.8.8.8:8080/hook?x=1")
    assert v4.url(v4.addresses[0]) == "http://8.8.8.8:8080/hook?x=1" and v4.headers == {"Host": "8.8.8.8:8080"}
    v6 = AddressPolicy().destination("https://[2606:4700::1111]/")
    assert v6.url(v6.addresses[0]) == "https://[2606:4700::1111]:443/" and v6.extensions == {}
    assert forbidden_kind(ipaddress.ip_address("64:ff9b::808:808")) is None  # NAT64 of a public address

    named = AddressPolicy(resolver=lambda host, port: [ipaddress.ip_address("93.184.215.14")])
    destination = named.destination("https://hooks.example.com/in")
    assert destination.url(destination.addresses[0]) == "https://93.184.215.14:443/in"
    assert destination.headers == {"Host": "hooks.example.com"}
    assert destination.extensions == {"sni_hostname": "hooks.example.com"}  # TLS checks the name, not the address


def test_a_name_with_any_internal_address_is_refused() -> None:
    mixed = AddressPolicy(resolver=lambda host, port: [ipaddress.ip_address(a) for a in ("93.184.215.14", "10.1.2.3")])
    with pytest.raises(WebhookRefused, match=re.escape("hooks.example.com resolves to 10.1.2.3, a private address")):
        mixed.destination("http://hooks.example.com/")
    mapped = AddressPolicy(resolver=lambda host, port: [ipaddress.ip_address("::ffff:169.254.169.254")])
    with pytest.raises(WebhookRefused, match="link-local"):
        mapped.destination("http://hooks.example.com/")


def test_the_allowlist_admits_chosen_addresses_networks_and_names() -> None:
    policy = AddressPolicy(["127.0.0.2", "10.0.0.0/8", "fd00::/8", "Hooks.Internal."],
                           resolver=lambda host, port: [ipaddress.ip_address("192.168.7.7")])
    for url in ("http://127.0.0.2:9000/", "http://[::ffff:127.0.0.2]/", "http://10.9.8.7/", "http://[fd00::1]/",
                "http://hooks.internal/"):
        policy.destination(url)
    for url in ("http://127.0.0.1/", "http://169.254.169.254/", "http://other.internal/", "http://u:p@127.0.0.2/"):
        with pytest.raises(WebhookRefused):
            policy.destination(url)
    with pytest.raises(ValueError, match="neither"):
        AddressPolicy(["http://x/"])


def test_parse_target_keeps_path_query_and_default_port() -> None:
    target = parse_target("HTTPS://Example.COM./a/b?c=d#frag")
    assert (target.scheme, target.host, target.port, target.path, target.address) == (
        "https", "example.com", 443, "/a/b?c=d", None)


def test_the_secret_is_made_once_kept_private_and_the_environment_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TEST_WEBHOOK_SECRET", raising=False)
    path = tmp_path / "data" / "webhook_secret"
    made = load_secret("TEST_WEBHOOK_SECRET", path)
    assert made.startswith("whsec_") and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret("TEST_WEBHOOK_SECRET", path) == made
    configured = new_secret()
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", configured)
    assert load_secret("TEST_WEBHOOK_SECRET", path) == configured
    for bad in ("not-a-secret", "whsec_!!!", "whsec_" + "QUFB"):  # no prefix, not base64, 3 bytes
        monkeypatch.setenv("TEST_WEBHOOK_SECRET", bad)
        with pytest.raises(SecretError):
            load_secret("TEST_WEBHOOK_SECRET", path)


def test_signed_headers_verify_with_the_standard_webhooks_library() -> None:
    secret = new_secret()
    body = json.dumps({"request_id": "ab" * 16, "status": "Succeed"})
    headers = Signer(secret).headers("msg_1", body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_s(n, 2.0, 20.0) for n in range(1, 6)] == [2.0, 4.0, 8.0, 16.0, 20.0]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(sqlite_url(tmp_path / "jobs.db"))
    yield store
    store.close()


def finished_job(store: JobStore, owner: str = "a", url: str | None = "http://x/") -> str:
    job, _ = store.create(new_job_id(), owner, {"inference_steps": 1}, webhook_url=url)
    store.cancel(job.id, "by test")
    return job.id


SETTINGS = GatewaySettings(
    webhook_allow=(HOOK_HOST,), webhook_timeout_s=1.0, webhook_backoff_s=0.3, webhook_attempts=3,
    webhook_concurrency=8, webhook_per_owner=2,
)


@pytest.fixture
def secret() -> str:
    return new_secret()


def delivery_loop(store: JobStore, secret: str, settings: GatewaySettings = SETTINGS, **policy) -> Webhooks:
    webhooks = Webhooks(store, settings, Signer(secret), AddressPolicy(settings.webhook_allow, **policy))
    webhooks.start()
    return webhooks


def queue_webhook(store: JobStore, webhooks: Webhooks, url: str, owner: str = "a", body: dict | None = None) -> str:
    job_id = finished_job(store, owner, url)
    store.enqueue_webhook(job_id, owner, url, json.dumps(body or {"request_id": job_id}))
    webhooks.wake()
    return job_id


def wait_state(store: JobStore, job_id: str, state: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while store.delivery(job_id).state != state:
        assert time.monotonic() < deadline, store.delivery(job_id)
        time.sleep(0.05)


def test_a_failed_delivery_is_retried_after_its_backoff_with_the_same_signed_id(store, secret) -> None:
    receiver = Receiver([500])
    webhooks = delivery_loop(store, secret)
    try:
        job_id = queue_webhook(store, webhooks, receiver.url)
        first, second = receiver.wait_for(2)
        wait_state(store, job_id, "delivered")
    finally:
        webhooks.close()
        receiver.close()
    assert second.received_at - first.received_at >= SETTINGS.webhook_backoff_s
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == store.delivery(job_id).id
    assert Webhook(secret).verify(second.body, second.headers) == {"request_id": job_id}
    assert second.headers["Content-Type"] == "application/json" and store.delivery(job_id).attempts == 2


def test_trickling_receivers_are_cut_at_the_deadline_and_hold_only_their_owners_slots(store, secret) -> None:
    settings = replace(SETTINGS, webhook_timeout_s=2.0)
    slow, fast = Receiver(then=TRICKLE), Receiver()
    webhooks = delivery_loop(store, secret, settings)
    try:
        stuck = [queue_webhook(store, webhooks, slow.url, owner="a") for _ in range(3)]
        slow.wait_for(2)
        other = queue_webhook(store, webhooks, fast.url, owner="b")
        (call,) = fast.wait_for(1)
        wait_state(store, other, "delivered")
        calls = slow.wait_for(3, where=lambda c: c.closed_at is not None)
    finally:
        webhooks.close()
        slow.close()
        fast.close()
    first_two, third = calls[:2], calls[2]
    assert call.received_at < min(c.closed_at for c in first_two)  # owner b did not wait for owner a's slots
    for stuck_call in first_two:  # one deadline for the whole attempt, however slowly bytes come
        assert 1.9 <= stuck_call.closed_at - stuck_call.received_at < 3.5
    assert third.received_at >= min(c.closed_at for c in first_two) - 0.1  # owner a's third waited for a free slot
    assert "no answer within 2 s" in {store.delivery(job).last_error for job in stuck}


def test_stopping_does_not_wait_for_attempts_and_the_next_start_delivers_them(store, secret) -> None:
    receiver = Receiver([TRICKLE])
    settings = replace(SETTINGS, webhook_timeout_s=60)
    webhooks = delivery_loop(store, secret, settings)
    job_id = queue_webhook(store, webhooks, receiver.url)
    receiver.wait_for(1)
    started = time.monotonic()
    webhooks.close()
    assert time.monotonic() - started < 1.0
    pending = store.delivery(job_id)
    assert (pending.state, pending.attempts) == ("pending", 0)
    webhooks = delivery_loop(store, secret, settings)
    try:
        wait_state(store, job_id, "delivered")
    finally:
        webhooks.close()
        receiver.close()
    trickled, delivered = receiver.calls
    assert trickled.closed_at is not None and trickled.closed_at - started < 1.0
    assert trickled.headers["webhook-id"] == delivered.headers["webhook-id"]


def test_each_attempt_checks_the_address_again_and_connects_to_the_checked_one(store, secret) -> None:
    receiver = Receiver()
    answers = {"hooks.test": HOOK_HOST}
    webhooks = delivery_loop(store, secret, resolver=lambda host, port: [ipaddress.ip_address(answers[host])])
    try:
        url = f"http://hooks.test:{receiver.server.server_port}/in"
        delivered = queue_webhook(store, webhooks, url)
        wait_state(store, delivered, "delivered")
        answers["hooks.test"] = "127.0.0.1"  # the name now points elsewhere (DNS rebinding)
        refused = queue_webhook(store, webhooks, url, owner="b")
        deadline = time.monotonic() + 10
        while not store.delivery(refused).last_error:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        webhooks.close()
        receiver.close()
    (call,) = receiver.calls  # the system resolver knows no hooks.test: the connection went to the checked address
    assert call.headers["Host"] == f"hooks.test:{receiver.server.server_port}" and call.path == "/in"
    assert store.delivery(refused).last_error.startswith("refused: webhook_url: hooks.test resolves to 127.0.0.1")
