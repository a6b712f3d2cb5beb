-- Run once by the postgres image when its volume is new (docker-entrypoint-initdb.d): a login user per service,
-- each a member of the role the migrations grant (created here first, so that the users can join them; the
-- migrations leave existing roles alone). The schema's owner, `kiroku`, only migrates. Change the passwords.
CREATE ROLE kiroku_command NOLOGIN;
CREATE ROLE kiroku_query NOLOGIN;
CREATE ROLE kiroku_projector NOLOGIN;
CREATE ROLE command_service LOGIN PASSWORD 'command-secret' IN ROLE kiroku_command;
CREATE ROLE query_service LOGIN PASSWORD 'query-secret' IN ROLE kiroku_query;
CREATE ROLE projector_service LOGIN PASSWORD 'projector-secret' IN ROLE kiroku_projector;
