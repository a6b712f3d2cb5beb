-- The event store: the log itself, the uniqueness claims that guard it, the idempotency records of commands,
-- and the relay's checkpoint. See ARCHITECTURE.md, "The global position".

CREATE TABLE events (
    -- A ULID (the seed's VARCHAR(26)).
    id             varchar(26)  NOT NULL,
    aggregate_id   uuid         NOT NULL,
    aggregate_type varchar(100) NOT NULL,
    event_type     varchar(100) NOT NULL,
    -- The aggregate's version after this event, from 1 without holes.
    event_version  integer      NOT NULL,
    event_data     jsonb        NOT NULL,
    metadata       jsonb        NOT NULL DEFAULT '{}'::jsonb,
    occurred_at    timestamptz  NOT NULL,
    created_at     timestamptz  NOT NULL DEFAULT now(),
    -- The global position: xid8 of the appending transaction * 2^16 + the event's index in it. Readers only
    -- deliver positions below pg_snapshot_xmin(pg_current_snapshot()) * 2^16, where nothing lower can commit.
    position       bigint       NOT NULL,
    CONSTRAINT events_pkey PRIMARY KEY (id),
    CONSTRAINT events_aggregate_version_key UNIQUE (aggregate_id, event_version),
    CONSTRAINT events_position_key UNIQUE (position),
    CONSTRAINT events_version_positive CHECK (event_version >= 1),
    CONSTRAINT events_position_positive CHECK (position > 0)
);

-- A unique key (an Auth0 subject, a GitHub id) held by one aggregate. Written in the same transaction as the
-- events it guards, so a uniqueness rule cannot race.
CREATE TABLE claims (
    kind       varchar(50)  NOT NULL,
    value      varchar(300) NOT NULL,
    owner_id   uuid         NOT NULL,
    claimed_at timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT claims_pkey PRIMARY KEY (kind, value)
);

-- A command's answer, keyed by (caller, request_id), stored in the same transaction as its events so that a
-- retry gets the first answer back. Kept at least 24 hours (pruned by the relay leader).
CREATE TABLE idempotency_records (
    caller       varchar(300) NOT NULL,
    request_id   varchar(128) NOT NULL,
    outcome      jsonb        NOT NULL,
    aggregate_id uuid         NOT NULL,
    version      integer      NOT NULL,
    position     bigint       NOT NULL,
    created_at   timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_records_pkey PRIMARY KEY (caller, request_id)
);

CREATE INDEX idempotency_records_created_at_idx ON idempotency_records (created_at);

-- Where each named follower of the log (the relay) has got to: it has handled every event at or below it.
CREATE TABLE checkpoints (
    name       varchar(100) NOT NULL,
    position   bigint       NOT NULL,
    updated_at timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT checkpoints_pkey PRIMARY KEY (name)
);
