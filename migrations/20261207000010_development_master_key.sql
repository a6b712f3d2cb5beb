-- The development master key (used only with KIROKU_DEV_MASTER_KEY_IN_DATABASE=true) is made here, by the
-- schema's owner, and never by a service: no service role may write it (the query service, which only reads, could
-- INSERT into it). 32 bytes from two version-4 UUIDs: 244 bits from PostgreSQL's strong random source.
INSERT INTO database_master_key (id, key)
SELECT 1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
ON CONFLICT (id) DO NOTHING;
REVOKE INSERT, UPDATE, DELETE ON database_master_key FROM kiroku_command, kiroku_query, kiroku_projector;
