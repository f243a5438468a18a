"""The store, on SQLite and (pytest --database postgresql) on PostgreSQL: tenant scoping,
whole versions, keys, recovery after a restart, migrations."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import numpy as np
import pytest
import sqlalchemy as sa

from adapters.migrations import latest_revision
from adapters.store import GAVE_UP, INTERRUPTED, Lease, LeaseLost, Store
from tests.postgres import database_for


@pytest.fixture
def store(database_url):
    s = Store(database_url)
    yield s
    s.close()


def _save(store, tenant_id, head_id, hashes, labels=("a", "b")):
    vectors = {h: np.full(4, i, dtype=np.float32) for i, h in enumerate(hashes)}
    return store.save_version(
        tenant_id=tenant_id,
        head_id=head_id,
        backbone="bb",
        new_embeddings=vectors,
        examples=[(h, labels[i % 2]) for i, h in enumerate(hashes)],
        labels=list(labels),
        weights=np.ones((4, 2), dtype=np.float32),
        bias=np.zeros(2, dtype=np.float32),
        prototypes=np.eye(4, 2, dtype=np.float32),
        unknown_threshold=0.25,
        metrics={"n_examples": len(hashes)},
    )


def test_keys_are_stored_hashed_and_checked(store) -> None:
    tenant, key = store.create_tenant(name="acme")
    assert store.authenticate(api_key=key) == tenant
    assert store.authenticate(api_key=key[:-1] + ("x" if key[-1] != "x" else "y")) is None
    assert store.authenticate(api_key="graft_" + tenant.id + "_") is None
    assert store.authenticate(api_key="") is None
    with store.engine.connect() as db:
        raw = db.exec_driver_sql("SELECT * FROM tenants").all()
    secret = key.split("_", 2)[2]  # graft_<tenant id>_<secret>; the secret may hold "_"
    assert secret not in repr(raw)
    # A rotated key replaces the old one at once; an unknown tenant has none to rotate.
    new_key = store.rotate_key(tenant_id=tenant.id)
    assert store.authenticate(api_key=key) is None and store.authenticate(api_key=new_key) == tenant
    assert store.rotate_key(tenant_id="no-such-tenant") is None
    assert store.list_tenants() == [tenant]


def test_heads_are_scoped_to_their_tenant(store) -> None:
    a, _ = store.create_tenant(name="a")
    b, _ = store.create_tenant(name="b")
    head = store.create_head(tenant_id=a.id, name="h", backbone="bb")
    store.create_head(tenant_id=b.id, name="h", backbone="bb")
    store.create_head(tenant_id=b.id, name="i", backbone="other")
    # The operator's count at start covers every tenant's heads.
    assert store.heads_per_backbone() == {"bb": 2, "other": 1}
    assert store.get_head(tenant_id=b.id, head_id=head.id) is None
    assert store.delete_head(tenant_id=b.id, head_id=head.id) is False
    assert _save(store, b.id, head.id, ["x", "y"]) is None
    assert store.training_set(tenant_id=b.id, head_id=head.id) == []
    assert store.get_head(tenant_id=a.id, head_id=head.id).version == 0


def test_a_version_is_saved_whole(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb")
    assert head.status == "training" and not head.servable
    assert _save(store, tenant.id, head.id, ["x", "y"])
    saved = store.get_head(tenant_id=tenant.id, head_id=head.id)
    assert (saved.status, saved.version, saved.labels) == ("ready", 1, ["a", "b"])
    assert saved.weights.shape == (4, 2) and saved.servable
    np.testing.assert_array_equal(saved.prototypes, np.eye(4, 2))
    assert saved.unknown_threshold == 0.25
    assert [
        (h, label) for h, label, _ in store.training_set(tenant_id=tenant.id, head_id=head.id)
    ] == [
        ("x", "a"),
        ("y", "b"),
    ]
    cached = store.cached_embeddings(tenant_id=tenant.id, backbone="bb", content_hashes=["x", "z"])
    assert set(cached) == {"x"}
    # A failure inside the transaction leaves the previous version as it was.
    with pytest.raises(ValueError), store._tx() as db:
        db.execute(sa.text("UPDATE heads SET version = 99 WHERE id = :id"), {"id": head.id})
        raise ValueError("crash mid-write")
    assert store.get_head(tenant_id=tenant.id, head_id=head.id).version == 1


def test_unlabelled_examples_travel_with_a_job_and_stay_with_their_head(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    other, _ = store.create_tenant(name="u")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb")
    job_id, _ = store.create_job(
        tenant_id=tenant.id, head_id=head.id, backbones=["bb"], owner="a/1/x", lease_s=30,
        examples=[("a", "text", b"labelled"), (None, "text", b"unlabelled")],
    )  # fmt: skip
    assert store.job_examples(job_id=job_id) == [
        ("a", "text", b"labelled"),
        (None, "text", b"unlabelled"),
    ]
    vectors = {h: np.full(4, i, dtype=np.float32) for i, h in enumerate(["x", "y", "u1", "u2"])}
    store.save_version(
        tenant_id=tenant.id, head_id=head.id, backbone="bb", new_embeddings=vectors,
        examples=[("x", "a"), ("y", "b")], labels=["a", "b"],
        weights=np.ones((4, 2), np.float32), bias=np.zeros(2, np.float32),
        prototypes=np.ones((4, 2), np.float32), unknown_threshold=None, metrics={},
        unlabeled=["u1", "u2"],
    )  # fmt: skip
    target = store.unlabeled_set(tenant_id=tenant.id, head_id=head.id)
    assert [h for h, _ in target] == ["u1", "u2"]
    np.testing.assert_array_equal(target[1][1], np.full(4, 3))
    assert store.unlabeled_keys(tenant_id=tenant.id, head_id=head.id) == {"u1", "u2"}
    # Unlabelled examples are not training examples, and no other tenant sees them.
    assert len(store.training_set(tenant_id=tenant.id, head_id=head.id)) == 2
    assert store.unlabeled_set(tenant_id=other.id, head_id=head.id) == []
    assert store.unlabeled_keys(tenant_id=other.id, head_id=head.id) == set()
    store.delete_head(tenant_id=tenant.id, head_id=head.id)
    with store._read() as db:
        assert db.scalar(sa.text("SELECT count(*) FROM head_unlabeled")) == 0


def test_a_fine_tuned_version_keeps_its_top_and_its_inputs_stay_with_their_tenant(
    store,
) -> None:
    tenant, _ = store.create_tenant(name="t")
    other, _ = store.create_tenant(name="u")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb", fine_tune="on")
    assert head.fine_tune == "on" and head.public()["fine_tune"] == "on"
    factors = [np.full((8, 4), 0.5, np.float32), np.full((4, 8), -0.25, np.float32)]
    store.save_version(
        tenant_id=tenant.id, head_id=head.id, backbone="bb", new_embeddings={},
        examples=[], labels=["a", "b"], weights=np.ones((4, 2), np.float32),
        bias=np.zeros(2, np.float32), prototypes=np.ones((4, 2), np.float32),
        unknown_threshold=None, metrics={}, top_factors=factors,
        inputs={"x": b"\xff\xd8 an image", "y": b"a\x00car"},  # NUL: valid text
    )  # fmt: skip
    served = store.serving_head(tenant_id=tenant.id, head_id=head.id)
    assert [f.dtype for f in served.top_factors] == [np.float16] * 2
    for got, saved in zip(served.top_factors, factors, strict=True):
        np.testing.assert_array_equal(got, saved)
    assert store.inputs(tenant_id=tenant.id, content_hashes=["x", "y", "z"]) == {
        "x": b"\xff\xd8 an image",
        "y": b"a\x00car",
    }
    assert store.inputs(tenant_id=other.id, content_hashes=["x"]) == {}
    # A frozen version has no top; a head created before fine-tuning existed is "off".
    _save(store, tenant.id, head.id, ["x", "y"])
    assert store.serving_head(tenant_id=tenant.id, head_id=head.id).top_factors is None
    assert store.create_head(tenant_id=tenant.id, name="old", backbone="bb").fine_tune == "off"
    store.delete_tenant(tenant_id=tenant.id)
    assert store.inputs(tenant_id=tenant.id, content_hashes=["x"]) == {}


def test_restart_resolves_interrupted_training(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    never_trained = store.create_head(tenant_id=tenant.id, name="new", backbone="bb")
    retraining = store.create_head(tenant_id=tenant.id, name="old", backbone="bb")
    _save(store, tenant.id, retraining.id, ["x", "y"])
    store.set_status(tenant_id=tenant.id, head_id=retraining.id, status="training")
    assert store.recover_interrupted() == 2
    failed = store.get_head(tenant_id=tenant.id, head_id=never_trained.id)
    assert (failed.status, failed.error) == ("failed", INTERRUPTED)
    back = store.get_head(tenant_id=tenant.id, head_id=retraining.id)
    assert (back.status, back.version) == ("ready", 1)


def test_deleting_a_tenant_removes_everything_it_owned(store) -> None:
    tenant, key = store.create_tenant(name="t")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb")
    _save(store, tenant.id, head.id, ["x", "y"])
    assert store.delete_tenant(tenant_id=tenant.id)
    assert store.authenticate(api_key=key) is None
    with store.engine.connect() as db:
        for table in ("heads", "embeddings", "head_examples"):
            assert db.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").one() == (0,)


# The schema of Graft's first release, as it created it (before Alembic).
FIRST_SCHEMA = """
CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL, key_salt BLOB NOT NULL,
    key_hash BLOB NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE heads (id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE, name TEXT NOT NULL,
    backbone TEXT NOT NULL, status TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL DEFAULT '[]', weights BLOB, bias BLOB, metrics TEXT, error TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE INDEX heads_by_tenant ON heads(tenant_id, created_at);
CREATE TABLE embeddings (tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    backbone TEXT NOT NULL, content_hash TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (tenant_id, backbone, content_hash));
CREATE TABLE head_examples (head_id TEXT NOT NULL REFERENCES heads(id) ON DELETE CASCADE,
    content_hash TEXT NOT NULL, label TEXT NOT NULL, PRIMARY KEY (head_id, content_hash, label));
"""


def test_a_data_directory_from_the_first_release_is_migrated_and_serves(tmp_path) -> None:
    """A SQLite store written before migrations existed gains the columns added since (and
    Alembic's version table) in place; its trained versions still load, with no class
    means and no unknown threshold."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(FIRST_SCHEMA)
    db.execute("INSERT INTO tenants VALUES ('t', 'old', x'00', x'00', '')")
    db.execute(
        "INSERT INTO heads (id, tenant_id, name, backbone, status, version, labels, weights,"
        " bias, created_at, updated_at) VALUES ('h', 't', 'n', 'bb', 'ready', 1, '[\"a\",\"b\"]',"
        " ?, ?, '', '')",
        (np.ones((4, 2), np.float32).tobytes(), np.zeros(2, np.float32).tobytes()),
    )
    db.commit()
    db.close()
    for _ in range(2):  # the second opening finds it migrated already
        store = Store(path)
        try:
            head = store.get_head(tenant_id="t", head_id="h")
            assert head.servable and head.prototypes is None and head.unknown_threshold is None
            assert head.label_descriptions == {}
            row = store.serving_head(tenant_id="t", head_id="h")
            assert row.weights.shape == (4, 2) and row.prototypes is None
        finally:
            store.close()
    with sqlite3.connect(path) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchall()
    assert revision == (latest_revision(),)


def _open_store(url: str, ready, answers) -> None:
    ready.wait()
    try:
        Store(url).close()
        answers.put("opened")
    except Exception as exc:  # the parent asserts on what each process says
        answers.put(repr(exc))


def test_processes_opening_a_new_store_at_once_all_open_it(tmp_path) -> None:
    # The runner and every API worker open (and migrate) the store at once when a server
    # first starts.
    context = multiprocessing.get_context("fork")
    for attempt in range(10):  # before the fix, about one new store in four failed
        folder = tmp_path / f"{attempt}"
        path = database_for(folder) or folder / "graft.sqlite3"
        ready, answers = context.Barrier(4), context.Queue()
        processes = [
            context.Process(target=_open_store, args=(path, ready, answers)) for _ in range(4)
        ]
        for process in processes:
            process.start()
        said = [answers.get(timeout=60) for _ in processes]
        for process in processes:
            process.join()
        assert said == ["opened"] * 4, said


def _job(store, tenant_id, head_id, owner="replica-a/1/x", lease_s=30.0):
    return store.create_job(
        tenant_id=tenant_id, head_id=head_id, backbones=["bb"],
        examples=[("a", "text", b"one"), ("b", "image", b"\x89PNG")], owner=owner,
        lease_s=lease_s,
    )  # fmt: skip


def test_a_job_keeps_its_examples_and_is_published_only_when_finished(store) -> None:
    """A job is stored with its examples before training; its version is served at once
    (ready=False) but the head turns ready only when the job finishes."""
    tenant, _ = store.create_tenant(name="t")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb")
    job_id, claimed = _job(store, tenant.id, head.id)
    assert claimed
    assert store.job_examples(job_id=job_id) == [("a", "text", b"one"), ("b", "image", b"\x89PNG")]
    version = store.save_version(
        tenant_id=tenant.id, head_id=head.id, backbone="bb", new_embeddings={}, examples=[],
        labels=["a", "b"], weights=np.ones((4, 2), np.float32), bias=np.zeros(2, np.float32),
        prototypes=np.ones((4, 2), np.float32), unknown_threshold=None, metrics={}, ready=False,
    )  # fmt: skip
    assert (version, store.get_head(tenant_id=tenant.id, head_id=head.id).status) == (1, "training")
    assert store.serving_head(tenant_id=tenant.id, head_id=head.id).version == 1
    store.finish_job(
        lease=Lease(job_id, "replica-a/1/x"), tenant_id=tenant.id, head_id=head.id, version=1
    )
    assert store.get_head(tenant_id=tenant.id, head_id=head.id).status == "ready"
    assert store.job_examples(job_id=job_id) == []
    assert store.claim_job(owner="b/1/y", lease_s=30) is None


def test_a_running_jobs_progress_shows_on_its_head_until_it_ends(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    other, _ = store.create_tenant(name="u")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb")
    store.create_head(tenant_id=tenant.id, name="quiet", backbone="bb")
    job_id, _ = _job(store, tenant.id, head.id, lease_s=0.05)

    def progress():
        return store.get_head(tenant_id=tenant.id, head_id=head.id).public()["progress"]

    assert progress() is None  # not started
    embedding = {"stage": "embedding", "done": 8, "total": 20}
    store.set_progress(lease=Lease(job_id, "replica-a/1/x"), progress=embedding)
    assert progress() == embedding
    assert [h.progress for h in store.list_heads(tenant_id=tenant.id)] == [embedding, None]
    assert store.list_heads(tenant_id=other.id) == []
    time.sleep(0.1)  # its process died: whoever takes the job over starts from nothing
    assert store.claim_job(owner="b/1/y", lease_s=30).id == job_id
    assert progress() is None
    taker = Lease(job_id, "b/1/y")
    store.set_progress(lease=taker, progress={"stage": "fitting", "done": 0, "total": 1})
    store.fail_job(lease=taker, tenant_id=tenant.id, head_id=head.id, error="broken")
    assert progress() is None


def test_a_job_whose_process_died_is_taken_over_then_given_up(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb")
    job_id, _ = _job(store, tenant.id, head.id)
    assert store.claim_job(owner="b/1/y", lease_s=30) is None  # its lease is live
    store.renew_leases(owner="replica-a/1/x", lease_s=-1)  # ... and it ran out: the process died
    taken = store.claim_job(owner="b/1/y", lease_s=0.05)
    assert (taken.id, taken.head_id, taken.backbones, taken.attempts) == (
        job_id,
        head.id,
        ["bb"],
        2,
    )
    store.release_job(lease=Lease(job_id, "b/1/y"))  # a passing failure: not counted
    assert store.claim_job(owner="b/1/y", lease_s=0.05).attempts == 2
    time.sleep(0.1)
    assert store.claim_job(owner="c/1/z", lease_s=0.05).attempts == 3
    time.sleep(0.1)
    assert store.claim_job(owner="c/1/z", lease_s=30) is None  # a fourth time: given up
    failed = store.get_head(tenant_id=tenant.id, head_id=head.id)
    assert (failed.status, failed.error) == ("failed", GAVE_UP)
    assert store.job_examples(job_id=job_id) == []


def test_a_process_whose_job_was_taken_over_or_given_up_writes_nothing_of_it(store) -> None:
    """The fence: a live process too busy to renew its lease loses the job to another
    (or the job is given up); what it then writes of the job is refused, whole."""
    tenant, _ = store.create_tenant(name="t")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb")
    job_id, _ = _job(store, tenant.id, head.id, owner="a/1/x")
    slow, taker = Lease(job_id, "a/1/x"), Lease(job_id, "b/1/y")
    store.renew_leases(owner="a/1/x", lease_s=-1)  # its lease ran out, its process alive
    assert store.claim_job(owner="b/1/y", lease_s=30).id == job_id

    def save_with(lease: Lease) -> int | None:
        return store.save_version(
            tenant_id=tenant.id, head_id=head.id, backbone="bb", new_embeddings={},
            examples=[], labels=["a", "b"], weights=np.ones((4, 2), np.float32),
            bias=np.zeros(2, np.float32), prototypes=np.ones((4, 2), np.float32),
            unknown_threshold=None, metrics={}, ready=False, lease=lease,
        )  # fmt: skip

    writes = {
        "save": lambda lease: save_with(lease),
        "progress": lambda lease: store.set_progress(lease=lease, progress={"stage": "fitting"}),
        "publish": lambda lease: store.publish_version(
            lease=lease, tenant_id=tenant.id, head_id=head.id, version=1
        ),
        "finish": lambda lease: store.finish_job(
            lease=lease, tenant_id=tenant.id, head_id=head.id, version=1
        ),
        "fail": lambda lease: store.fail_job(
            lease=lease, tenant_id=tenant.id, head_id=head.id, error="x"
        ),
        "release": lambda lease: store.release_job(lease=lease),
    }
    for write in writes.values():
        with pytest.raises(LeaseLost):
            write(slow)
    after = store.get_head(tenant_id=tenant.id, head_id=head.id)
    assert (after.status, after.version, after.progress) == ("training", 0, None)
    # The job is the taker's, untouched: it saves and finishes it.
    assert save_with(taker) == 1
    store.finish_job(lease=taker, tenant_id=tenant.id, head_id=head.id, version=1)
    assert store.get_head(tenant_id=tenant.id, head_id=head.id).status == "ready"

    # Given up (its holders' leases ran out once too often): no holder may write it.
    job_id, _ = _job(store, tenant.id, head.id, owner="a/1/x")
    holder = "a/1/x"
    for next_holder in ("b/1/y", "c/1/z"):
        store.renew_leases(owner=holder, lease_s=-1)
        assert store.claim_job(owner=next_holder, lease_s=30).id == job_id
        holder = next_holder
    store.renew_leases(owner=holder, lease_s=-1)
    assert store.claim_job(owner="d/1/w", lease_s=30) is None  # a fourth time: given up
    with pytest.raises(LeaseLost):
        save_with(Lease(job_id, holder))
    given_up = store.get_head(tenant_id=tenant.id, head_id=head.id)
    # Back on its last version, saying why; the holder's version 2 was never stored.
    assert (given_up.status, given_up.error, given_up.version) == ("ready", GAVE_UP, 1)


def test_a_head_trains_one_job_at_a_time_oldest_first(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    head = store.create_head(tenant_id=tenant.id, name="h", backbone="bb")
    first, claimed_first = _job(store, tenant.id, head.id)
    second, claimed_second = _job(store, tenant.id, head.id)
    assert claimed_first and not claimed_second
    assert store.claim_job(owner="b/1/y", lease_s=30) is None  # waits behind the first
    lease = Lease(first, "replica-a/1/x")
    store.fail_job(lease=lease, tenant_id=tenant.id, head_id=head.id, error="bad input")
    assert store.get_head(tenant_id=tenant.id, head_id=head.id).error == "bad input"
    assert store.claim_job(owner="b/1/y", lease_s=30).id == second


def test_a_restarting_replica_frees_its_jobs_and_only_its_own(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    mine = store.create_head(tenant_id=tenant.id, name="mine", backbone="bb")
    theirs = store.create_head(tenant_id=tenant.id, name="theirs", backbone="bb")
    _job(store, tenant.id, mine.id, owner="host-1234/77/ab")
    _job(store, tenant.id, theirs.id, owner="host-12345/78/cd")
    assert store.release_leases(owner_prefix="host-1234/") == 1
    assert store.claim_job(owner="host-1234/79/ef", lease_s=30).head_id == mine.id
    assert store.claim_job(owner="host-1234/79/ef", lease_s=30) is None
    # A head with a job is not "interrupted": its job will finish it.
    assert store.recover_interrupted() == 0
