-- GitHub recycles logins: one that a user renamed away from may be taken by another account, which then registers
-- with it while the first user's row still shows it (until they sync). LookupUser by login answers the user who
-- took the login last: the position of the event that gave each row its current login. Rows from before this
-- column get their registration's position, which a rebuild makes exact.
ALTER TABLE users_read_rows ADD COLUMN login_position bigint NOT NULL DEFAULT 0;
UPDATE users_read_rows SET login_position = registered_position;
DROP INDEX users_read_rows_login_idx;
CREATE INDEX users_read_rows_login_idx
    ON users_read_rows (generation, lower(github_username) text_pattern_ops, login_position DESC);

CREATE OR REPLACE VIEW users_read AS
SELECT u.id, u.auth0_id, u.github_id, u.github_username, u.display_name, u.avatar_url, u.status,
       u.created_at, u.updated_at, u.version, u.position, u.registered_position, u.login_position
FROM users_read_rows u
JOIN projections p ON p.name = 'users' AND u.generation = p.active_generation;
