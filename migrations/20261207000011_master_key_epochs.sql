-- Master keys by id (a digest of the key, never the key). `kiroku keys rotate` records the one it made current;
-- `kiroku keys retire` marks one retired once no data key needs it, after which no service starts with it among
-- its keys: its material is to be destroyed, and with it every backup that only it opens.
CREATE TABLE master_keys (
    id            varchar(64) NOT NULL,
    current_since timestamptz,
    retired_at    timestamptz,
    CONSTRAINT master_keys_pkey PRIMARY KEY (id)
);

GRANT SELECT ON master_keys TO kiroku_command, kiroku_query, kiroku_projector;
