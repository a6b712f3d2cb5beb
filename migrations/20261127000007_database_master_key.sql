-- Without KIROKU_MASTER_KEY, services whose database is on loopback (development, tests) share a master key kept
-- here, made by the first to start. Whoever can read the database can then open personal data at rest; an
-- erasure still destroys what it erases (the person's data key goes). Elsewhere KIROKU_MASTER_KEY is required and
-- this table stays empty.
CREATE TABLE database_master_key (
    id         smallint    NOT NULL DEFAULT 1,
    key        bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT database_master_key_pkey PRIMARY KEY (id),
    CONSTRAINT database_master_key_one CHECK (id = 1)
);

GRANT SELECT, INSERT ON database_master_key TO kiroku_command, kiroku_query, kiroku_projector;
