//! Accounts: the sign-in lockout's reservations hold for the installation.

use crate::common::Backend;
use chrono::{Duration, Utc};
use panel_store::{SignInReservation, Store};

/// Thirty parallel attempts from two services (two pools on one database): five are counted,
/// the rest are refused before any password would be checked.
async fn parallel_sign_ins_from_two_services_reserve_at_most_the_limit(b: &Backend) {
    let other = Store::open(&b.url).await.unwrap();
    let now = Utc::now();
    let keys = [("pair:ann|192.0.2.7".to_string(), 5), ("ip:192.0.2.7|".to_string(), 5)];
    let attempts = (0..30).map(|i| {
        let store = if i % 2 == 0 { b.store.clone() } else { other.clone() };
        let keys = keys.clone();
        tokio::spawn(async move { store.reserve_sign_in(&keys, now - Duration::minutes(15), now).await.unwrap() })
    });
    let mut reserved = Vec::new();
    let mut blocked = 0;
    for a in attempts {
        match a.await.unwrap() {
            SignInReservation::Reserved(ids) => reserved.push(ids),
            SignInReservation::Blocked { oldest } => {
                assert_eq!(oldest.timestamp_millis(), now.timestamp_millis());
                blocked += 1;
            }
        }
    }
    assert_eq!((reserved.len(), blocked), (5, 25));

    // A success gives its own reservation back and forgives the forgiven keys, not the
    // address's: it has one failure left, so one more attempt is counted and then it is blocked.
    let forgiven = ["pair:ann|192.0.2.7".to_string()];
    b.store.forgive_sign_in(&reserved[0], &forgiven, ("ann", "192.0.2.7"), now).await.unwrap();
    assert!(b.store.is_known_client("ann", "192.0.2.7").await.unwrap());
    assert!(!b.store.is_known_client("ann", "192.0.2.8").await.unwrap());
    let since = now - Duration::minutes(15);
    assert!(matches!(b.store.reserve_sign_in(&keys, since, now).await.unwrap(), SignInReservation::Reserved(_)));
    let other_name = [("pair:bob|192.0.2.7".to_string(), 5), ("ip:192.0.2.7|".to_string(), 5)];
    let r = b.store.reserve_sign_in(&other_name, since, now).await.unwrap();
    assert!(matches!(r, SignInReservation::Blocked { .. }), "the address is blocked for every name: {r:?}");
    assert_eq!(b.store.sign_in_count("ip:192.0.2.7|", since).await.unwrap().0, 5);
    // An unlock clears by prefix, and is audited.
    assert_eq!(b.store.clear_sign_in(&["ip:192.0.2.7|".to_string()], "ann", "cli:root", now).await.unwrap(), 5);
    assert!(b.store.audit_log(5).await.unwrap().iter().any(|e| e.action == "admin.unlocked"));
    assert!(matches!(b.store.reserve_sign_in(&other_name, since, now).await.unwrap(), SignInReservation::Reserved(_)));
    // Outside the window, nothing counts any more.
    let later = now + Duration::minutes(16);
    let r = b.store.reserve_sign_in(&keys, later - Duration::minutes(15), later).await.unwrap();
    assert!(matches!(r, SignInReservation::Reserved(_)), "{r:?}");
}

/// API tokens are listed per account or for all, by an id that is not the token, and revoked
/// by it with an audit entry.
async fn api_tokens_are_listed_and_revoked_by_id(b: &Backend) {
    let now = Utc::now();
    for admin in ["ann", "bob"] {
        b.store.put_admin(admin, "admin", "$argon2id$x", false, "test", now).await.unwrap();
    }
    b.store.add_token(&"a".repeat(64), "token", "ann", "hr-sync", None, None, now).await.unwrap();
    b.store.add_token(&"b".repeat(64), "token", "bob", "ci", None, None, now).await.unwrap();
    b.store.add_token(&"c".repeat(64), "session", "ann", "web", Some("csrf"), None, now).await.unwrap();
    let all = b.store.tokens(None).await.unwrap();
    assert_eq!(
        all.iter().map(|t| (t.id.as_str(), t.label.as_str())).collect::<Vec<_>>(),
        [("aaaaaaaaaaaa", "hr-sync"), ("bbbbbbbbbbbb", "ci")]
    );
    assert_eq!(b.store.tokens(Some("bob")).await.unwrap().len(), 1);
    // The token's read says which settings version and definitions generation are current.
    let seen = |o: panel_store::TokenOwner| (o.settings_version, o.definitions);
    let before = seen(b.store.token_owner(&"b".repeat(64), now).await.unwrap().unwrap());
    assert_eq!(before.0, 0, "no settings saved yet");
    let doc = panel_domain::SettingsDoc { host: Some("relay.example.org".into()), ..Default::default() };
    assert_eq!(b.store.save_settings(0, &doc, "t", now, &[]).await.unwrap(), 1);
    assert_eq!(b.store.token_owner(&"b".repeat(64), now).await.unwrap().map(seen), Some((1, before.1)));
    let def = panel_store::NewDefinition {
        kind: panel_store::DefinitionKind::Template,
        name: "welcome".into(),
        doc: serde_json::json!({"subject": "Hi"}),
        enabled: true,
        trigger: None,
        next_fire_at: None,
    };
    b.store.save_definition(&def, panel_store::SaveMode::Create, "t", now).await.unwrap();
    let after = b.store.token_owner(&"b".repeat(64), now).await.unwrap().map(seen).unwrap();
    assert!(after.0 == 1 && after.1 > before.1, "{before:?} -> {after:?}");
    assert!(b.store.revoke_token("cccccccccccc", "test", now).await.unwrap().is_none(), "sessions are not API tokens");
    let revoked = b.store.revoke_token("aaaaaaaaaaaa", "root", now).await.unwrap().unwrap();
    assert_eq!(revoked.admin, "ann");
    assert!(b.store.token_owner(&"a".repeat(64), now).await.unwrap().is_none());
    let audit = b.store.audit_log(10).await.unwrap();
    assert!(audit.iter().any(|e| e.action == "token.revoked" && e.actor == "root" && e.subject == "ann"), "{audit:?}");
}

/// The setup link's account: made once, by one of two services using their links at once, and
/// never once any account exists.
async fn the_first_admin_is_made_once_however_many_services_try(b: &Backend) {
    let other = Store::open(&b.url).await.unwrap();
    let now = Utc::now();
    let tries = (0..6).map(|i| {
        let store = if i % 2 == 0 { b.store.clone() } else { other.clone() };
        let name = format!("first{i}");
        tokio::spawn(
            async move { store.create_first_admin(&name, "admin", "$argon2id$x", "setup", now).await.unwrap() },
        )
    });
    let mut made = 0;
    for t in tries {
        made += usize::from(t.await.unwrap());
    }
    assert_eq!((made, b.store.admins().await.unwrap().len()), (1, 1));
    let audit = b.store.audit_log(5).await.unwrap();
    assert!(audit.iter().any(|e| e.action == "admin.created" && e.detail.contains("setup link")), "{audit:?}");
    assert!(!b.store.create_first_admin("late", "admin", "$argon2id$x", "setup", now).await.unwrap());
}

/// Concurrent requests' tokens are looked up together on PostgreSQL (one read for those that
/// arrive while another runs): each gets its own token's owner as of its own time, and an
/// unknown, expired or revoked token nobody.
async fn concurrent_token_lookups_each_get_their_own_owner_as_of_their_own_time(b: &Backend) {
    let now = Utc::now();
    for admin in ["ann", "bob"] {
        b.store.put_admin(admin, "admin", "$argon2id$x", false, "test", now).await.unwrap();
    }
    let [a, bb, c, d, unknown] = ["a", "b", "c", "d", "e"].map(|x| x.repeat(64));
    b.store.add_token(&a, "token", "ann", "one", None, None, now).await.unwrap();
    b.store.add_token(&bb, "token", "bob", "two", None, None, now).await.unwrap();
    let ends = now + Duration::minutes(1);
    b.store.add_token(&c, "session", "ann", "web", Some("csrf"), Some(ends), now).await.unwrap();
    b.store.add_token(&d, "token", "bob", "gone", None, None, now).await.unwrap();
    b.store.revoke_token("dddddddddddd", "root", now).await.unwrap().unwrap();
    let cases = [
        (a.clone(), now, Some("ann")),
        (bb.clone(), now, Some("bob")),
        (c.clone(), now, Some("ann")),
        (c.clone(), ends + Duration::seconds(1), None),
        (d.clone(), now, None),
        (unknown.clone(), now, None),
    ];
    let lookups: Vec<_> = (0..60)
        .map(|i| {
            let (hash, at, owner) = cases[i % cases.len()].clone();
            let store = b.store.clone();
            (owner, tokio::spawn(async move { store.token_owner(&hash, at).await.unwrap() }))
        })
        .collect();
    for (i, (owner, lookup)) in lookups.into_iter().enumerate() {
        let found = lookup.await.unwrap();
        assert_eq!(found.as_ref().map(|o| o.admin.as_str()), owner, "lookup {i}");
        if let Some(o) = found {
            assert_eq!(o.csrf.is_some(), o.kind == "session", "lookup {i}: {o:?}");
        }
    }
}

/// A token's owner, once read, is kept for a request that sends one message (PostgreSQL; SQLite
/// reads every time): its write carries the fence and goes in only while the token, the role and
/// the settings are as read. Each changed by another service (another pool), with this one's
/// owner still kept, stops the next write, which writes nothing; a fresh read keeps the change.
async fn a_message_sent_on_a_kept_token_owner_is_written_only_while_its_access_is_unchanged(b: &Backend) {
    use crate::common::message;
    use panel_domain::Origin;
    use panel_store::StoreError;
    let (s, other) = (&b.store, Store::open(&b.url).await.unwrap());
    let now = Utc::now();
    s.put_admin("ann", "operator", "$argon2id$x", false, "test", now).await.unwrap();
    let (token, session) = ("d".repeat(64), "e".repeat(64));
    s.add_token(&token, "token", "ann", "hr-sync", None, None, now).await.unwrap();
    s.add_token(&session, "session", "ann", "web", Some("csrf"), Some(now + Duration::minutes(5)), now).await.unwrap();
    let queued = || async { s.queue_stats(Utc::now()).await.unwrap().queued };
    let send = |fence| s.enqueue_fenced(Origin::MailTester, message("kept"), Utc::now(), fence);
    // Read once; then kept (PostgreSQL), with the fence its write carries.
    assert_eq!(s.token_owner(&token, now).await.unwrap().unwrap().role, "operator");
    let (owner, fence) = s.token_owner_kept(&token, now).await.unwrap().unwrap();
    assert_eq!((owner.admin.as_str(), fence.is_some()), ("ann", s.is_shared()), "kept on PostgreSQL only");
    let Some(fence) = fence else { return };
    assert!(!format!("{fence:?}").contains(&token), "a debug print does not carry the token's digest");
    send(Some(fence.clone())).await.unwrap();
    assert_eq!(queued().await, 1);

    // The settings saved by another service: the kept owner is still served (no read), and its
    // write is refused, nothing written; a read shows the new version and is kept.
    let doc = panel_domain::SettingsDoc { host: Some("relay.example.org".into()), ..Default::default() };
    assert_eq!(other.save_settings(0, &doc, "t", now, &[]).await.unwrap(), 1);
    let (_, still) = s.token_owner_kept(&token, now).await.unwrap().unwrap();
    assert_eq!(still.as_ref(), Some(&fence), "kept: the change is found by the write");
    assert!(matches!(send(still).await, Err(StoreError::Stale)));
    assert_eq!(queued().await, 1, "nothing written");
    assert_eq!(s.token_owner(&token, now).await.unwrap().unwrap().settings_version, 1);
    let fence = s.token_owner_kept(&token, now).await.unwrap().unwrap().1.expect("kept again");
    send(Some(fence.clone())).await.unwrap();
    assert_eq!(queued().await, 2);

    // The role lowered in place (Panel's own account changes end the account's tokens too,
    // below): refused while kept.
    let db = sqlx::PgPool::connect(&b.url).await.unwrap();
    sqlx::query("UPDATE admins SET role = 'viewer' WHERE name = 'ann'").execute(&db).await.unwrap();
    assert!(matches!(send(Some(fence.clone())).await, Err(StoreError::Stale)));
    assert_eq!(s.token_owner(&token, now).await.unwrap().unwrap().role, "viewer");
    assert_eq!(s.token_owner_kept(&token, now).await.unwrap().unwrap().0.role, "viewer", "what a read found is kept");
    sqlx::query("UPDATE admins SET role = 'operator' WHERE name = 'ann'").execute(&db).await.unwrap();
    db.close().await;
    assert_eq!(s.token_owner(&token, now).await.unwrap().unwrap().role, "operator");
    let fence = s.token_owner_kept(&token, now).await.unwrap().unwrap().1.expect("kept");

    // A session past its end: not served from memory, and its fence refused by the database.
    let (_, session_fence) = s.token_owner_kept(&session, now).await.unwrap().unwrap();
    assert!(session_fence.is_none(), "read, not kept yet");
    let session_fence = s.token_owner_kept(&session, now).await.unwrap().unwrap().1.expect("kept");
    assert!(s.token_owner_kept(&session, now + Duration::minutes(6)).await.unwrap().is_none(), "ended");
    let late = s.enqueue_fenced(Origin::MailTester, message("late"), now + Duration::minutes(6), Some(session_fence));
    assert!(matches!(late.await, Err(StoreError::Stale)));

    // The token revoked by another service, among concurrent sends in one group: only the
    // revoked token's send is refused; the others are written.
    s.add_token(&"f".repeat(64), "token", "ann", "other", None, None, now).await.unwrap();
    assert!(s.token_owner(&"f".repeat(64), now).await.unwrap().is_some());
    let kept_other = s.token_owner_kept(&"f".repeat(64), now).await.unwrap().unwrap().1.expect("kept");
    assert_eq!(other.revoke_token(&token[..12], "root", now).await.unwrap().map(|t| t.admin), Some("ann".into()));
    let before = queued().await;
    let sends: Vec<_> = (0..12)
        .map(|i| {
            let (s, fence) = (s.clone(), if i == 5 { fence.clone() } else { kept_other.clone() });
            tokio::spawn(async move {
                s.enqueue_fenced(Origin::MailTester, message("group"), Utc::now(), Some(fence)).await
            })
        })
        .collect();
    for (i, send) in sends.into_iter().enumerate() {
        let outcome = send.await.unwrap();
        assert_eq!(matches!(outcome, Err(StoreError::Stale)), i == 5, "send {i}: {outcome:?}");
    }
    assert_eq!(queued().await, before + 11);
    assert!(s.token_owner(&token, now).await.unwrap().is_none(), "revoked");
    assert!(s.token_owner_kept(&token, now).await.unwrap().is_none(), "and forgotten once read");

    // The account changed by another service (a new role and password end its tokens).
    other.put_admin("ann", "viewer", "$argon2id$y", true, "root", now).await.unwrap();
    let late = s.enqueue_fenced(Origin::MailTester, message("late"), Utc::now(), Some(kept_other));
    assert!(matches!(late.await, Err(StoreError::Stale)));
    assert_eq!(queued().await, before + 11);
}

contract!(
    a_message_sent_on_a_kept_token_owner_is_written_only_while_its_access_is_unchanged,
    concurrent_token_lookups_each_get_their_own_owner_as_of_their_own_time,
    parallel_sign_ins_from_two_services_reserve_at_most_the_limit,
    api_tokens_are_listed_and_revoked_by_id,
    the_first_admin_is_made_once_however_many_services_try
);
