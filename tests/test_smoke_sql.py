import uuid

from handler.store import QueueStore, Settlement


def test_enqueue_claim_complete(store: QueueStore) -> None:
    tenant = uuid.uuid4()
    job_id = store.enqueue(tenant, "ingest_slack", {"a": 1})
    claimed = store.claim("w1", lease_seconds=60, max_jobs=10, max_per_tenant=10)
    assert [j.id for j in claimed] == [job_id]
    assert claimed[0].attempt == 1 and not claimed[0].rescued
    res = store.settle("w1", [Settlement(job_id, 1, "completed")])
    assert res == {job_id: "completed"}
    job = store.get_job(job_id)
    assert job is not None and job.status == "completed"
