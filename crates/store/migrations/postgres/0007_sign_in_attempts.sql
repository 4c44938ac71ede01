-- Sign-in attempts, counted per account name and per client address for the lockout. An attempt
-- is reserved here before the password is checked, so parallel guesses cannot pass the limit,
-- and it holds for every service sharing the database. A successful sign-in removes its own.
CREATE TABLE sign_in_attempts (
    id  BIGSERIAL PRIMARY KEY,
    key TEXT   NOT NULL,
    at  BIGINT NOT NULL
);
CREATE INDEX sign_in_attempts_key ON sign_in_attempts (key, at);
CREATE INDEX sign_in_attempts_at ON sign_in_attempts (at);
