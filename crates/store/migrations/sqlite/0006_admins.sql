-- Local admin accounts for the web UI and API. password_hash is an Argon2id PHC string.
CREATE TABLE admins (
    name          TEXT   PRIMARY KEY,
    role          TEXT   NOT NULL,
    password_hash TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

-- Signed-in browser sessions and API tokens: only the SHA-256 of the secret is kept.
-- kind 'session' expires and carries its CSRF token; kind 'token' is for scripts (no CSRF).
CREATE TABLE auth_tokens (
    token_hash   TEXT   PRIMARY KEY,
    kind         TEXT   NOT NULL,
    admin        TEXT   NOT NULL REFERENCES admins (name) ON DELETE CASCADE,
    label        TEXT   NOT NULL,
    csrf         TEXT,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT
);
CREATE INDEX auth_tokens_admin ON auth_tokens (admin);
