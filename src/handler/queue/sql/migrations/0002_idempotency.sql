-- queue-worker 0002: the PostgreSQL store for Powertools idempotency records
-- (handler.idempotency_store.PostgresPersistenceLayer), an alternative to the DynamoDB table.
--
-- One row per idempotency key, in the shape Powertools' DataRecord uses:
--   id                      the hashed idempotency key ("<function>#<md5 of the job id>")
--   status                  'INPROGRESS' or 'COMPLETED' (an expired record reads as EXPIRED)
--   expiration              when the record stops counting, epoch SECONDS
--   in_progress_expiration  when an INPROGRESS record may be taken over (the invocation that
--                           wrote it has timed out), epoch MILLISECONDS; NULL when unknown
--   data                    the stored response, JSON text
--   validation              the payload hash, when payload validation is configured
-- An expired row is dead weight: a put takes it over, and prune_expired() deletes old ones in
-- bounded batches, oldest first, through the index below.

CREATE TABLE queue_idempotency (
    id                      text        PRIMARY KEY,
    status                  text        NOT NULL,
    expiration              bigint      NOT NULL,
    in_progress_expiration  bigint,
    data                    text,
    validation              text,
    created_at              timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX queue_idempotency_expiration_idx ON queue_idempotency (expiration);
