-- Read models kept by kiroku-projector. Each is stored in generations so that a rebuild can fill a new one in
-- short transactions while queries keep reading the active one; a flip of `projections.active_generation` makes
-- queries use the new one at once. The views carry the read models' public names and show the active generation.

CREATE TABLE projections (
    name              varchar(100) NOT NULL,
    active_generation integer      NOT NULL,
    CONSTRAINT projections_pkey PRIMARY KEY (name)
);

-- The highest position below which every event has been applied to that generation (gaps included: positions
-- of events the projection ignores advance it too).
CREATE TABLE projection_checkpoints (
    projection varchar(100) NOT NULL,
    generation integer      NOT NULL,
    position   bigint       NOT NULL,
    updated_at timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT projection_checkpoints_pkey PRIMARY KEY (projection, generation)
);

-- Events that failed to apply, with their attempts; after enough attempts they are dead-lettered and skipped.
CREATE TABLE projection_failures (
    projection    varchar(100) NOT NULL,
    position      bigint       NOT NULL,
    attempts      integer      NOT NULL,
    last_error    text         NOT NULL,
    dead_lettered boolean      NOT NULL DEFAULT false,
    updated_at    timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT projection_failures_pkey PRIMARY KEY (projection, position)
);

INSERT INTO projections (name, active_generation) VALUES ('users', 1);
INSERT INTO projection_checkpoints (projection, generation, position) VALUES ('users', 1, 0);

CREATE TABLE users_read_rows (
    generation      integer      NOT NULL,
    id              uuid         NOT NULL,
    auth0_id        varchar(300) NOT NULL,
    github_id       varchar(30)  NOT NULL,
    github_username varchar(100) NOT NULL,
    display_name    varchar(300) NOT NULL,
    avatar_url      varchar(2000),
    status          varchar(20)  NOT NULL,
    created_at      timestamptz  NOT NULL,
    updated_at      timestamptz  NOT NULL,
    version         integer      NOT NULL,
    position        bigint       NOT NULL,
    CONSTRAINT users_read_rows_pkey PRIMARY KEY (generation, id),
    CONSTRAINT users_read_rows_auth0_key UNIQUE (generation, auth0_id),
    CONSTRAINT users_read_rows_github_key UNIQUE (generation, github_id)
);

-- Case-insensitive lookups and prefix filters on the login.
CREATE INDEX users_read_rows_login_idx ON users_read_rows (generation, lower(github_username) text_pattern_ops);

CREATE VIEW users_read AS
SELECT u.id, u.auth0_id, u.github_id, u.github_username, u.display_name, u.avatar_url, u.status,
       u.created_at, u.updated_at, u.version, u.position
FROM users_read_rows u
JOIN projections p ON p.name = 'users' AND u.generation = p.active_generation;

CREATE TABLE registration_failures_rows (
    generation        integer      NOT NULL,
    audit_id          uuid         NOT NULL,
    auth0_id          varchar(300) NOT NULL,
    github_id         varchar(30)  NOT NULL,
    reason            varchar(50)  NOT NULL,
    attempted_at      timestamptz  NOT NULL,
    duplicate_user_id uuid,
    position          bigint       NOT NULL,
    CONSTRAINT registration_failures_rows_pkey PRIMARY KEY (generation, audit_id)
);

CREATE INDEX registration_failures_rows_position_idx ON registration_failures_rows (generation, position DESC);

CREATE VIEW registration_failures_read AS
SELECT f.audit_id, f.auth0_id, f.github_id, f.reason, f.attempted_at, f.duplicate_user_id, f.position
FROM registration_failures_rows f
JOIN projections p ON p.name = 'users' AND f.generation = p.active_generation;
