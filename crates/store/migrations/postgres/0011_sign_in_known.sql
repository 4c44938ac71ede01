-- Client addresses an account signed in from successfully: the account-wide lock (many wrong
-- passwords for one name from anywhere) does not apply to them, so guessing at a name cannot
-- lock its owner out from an address known to be theirs.
CREATE TABLE sign_in_known (
    name   TEXT   NOT NULL,
    client TEXT   NOT NULL,
    at     BIGINT NOT NULL,
    PRIMARY KEY (name, client)
);
