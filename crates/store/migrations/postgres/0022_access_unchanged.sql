-- A service keeps the owners of the API tokens it read for up to a minute (`Store::token_owner_kept`)
-- and sends a message on a kept owner without reading the token again: the message is written only
-- while what the request was authorized on is unchanged, checked in the statement that writes it.
-- Raised as its own SQLSTATE (PN001), which the store reports as `StoreError::Stale`: nothing was
-- written, and the request reads its token afresh and is answered by what that read says.
CREATE FUNCTION panel_access_unchanged(fence_token TEXT, fence_role TEXT, fence_settings BIGINT, fence_now BIGINT)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM auth_tokens t JOIN admins a ON a.name = t.admin
                    WHERE t.token_hash = fence_token AND a.role = fence_role
                      AND (t.expires_at IS NULL OR t.expires_at > fence_now))
       OR (SELECT COALESCE(MAX(version), 0) FROM relay_settings) <> fence_settings THEN
        RAISE EXCEPTION 'the token, its role or the relay settings changed since the token was read'
            USING ERRCODE = 'PN001';
    END IF;
    RETURN TRUE;
END
$$;
