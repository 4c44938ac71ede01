//! Licenses, credentials and the audit log on both backends: every change audited in
//! its own transaction, generations bumped, and the master-key guard against racing a rotation.

use crate::common::Backend;
use chrono::Utc;
use panel_domain::SettingsDoc;
use panel_store::{AuditEvent, DeleteOutcome, NewCredential, PutOutcome, Rewrapped, StoreError};

fn credential(name: &str, key: &str) -> NewCredential {
    NewCredential {
        id: format!("cred_{name}"),
        name: name.into(),
        kind: "password".into(),
        username: "u".into(),
        attributes: Default::default(),
        master_key_id: key.into(),
        wrapped_key: vec![1, 2, 3],
        ciphertext: vec![4, 5, 6],
    }
}

fn actions(rows: &[panel_store::AuditRow]) -> Vec<&str> {
    rows.iter().map(|r| r.action.as_str()).collect()
}

async fn credential_changes_are_audited_and_bump_the_secrets_generation(b: &Backend) {
    let s = &b.store;
    let g0 = s.config_generation().await.unwrap().secrets;
    assert_eq!(s.put_credential(&credential("a", "mk_1"), "cli:ann", Utc::now()).await.unwrap(), PutOutcome::Created);
    assert_eq!(s.put_credential(&credential("a", "mk_1"), "cli:bob", Utc::now()).await.unwrap(), PutOutcome::Replaced);
    assert_eq!(s.config_generation().await.unwrap().secrets, g0 + 2);
    let row = s.credential("a").await.unwrap().unwrap();
    assert_eq!((row.created_by.as_str(), row.updated_by.as_str()), ("cli:ann", "cli:bob"));

    let used = AuditEvent::new("credential.first_used", "a", "");
    assert!(s.mark_credential_used(&row.id, "svc", Utc::now(), &used).await.unwrap());
    assert!(!s.mark_credential_used(&row.id, "svc", Utc::now(), &used).await.unwrap(), "only the first use");
    assert_eq!(s.current_master_key_id().await.unwrap().as_deref(), Some("mk_1"));

    let doc = SettingsDoc { credential: Some("a".into()), ..Default::default() };
    s.save_settings(0, &doc, "cli:ann", Utc::now(), &[AuditEvent::new("credential.attached", "a", "")]).await.unwrap();
    assert_eq!(s.delete_credential("a", "cli:ann", Utc::now()).await.unwrap(), DeleteOutcome::InUse);
    assert_eq!(s.delete_credential("zzz", "cli:ann", Utc::now()).await.unwrap(), DeleteOutcome::NotFound);
    s.save_settings(1, &SettingsDoc::default(), "cli:ann", Utc::now(), &[]).await.unwrap();
    assert_eq!(s.delete_credential("a", "cli:ann", Utc::now()).await.unwrap(), DeleteOutcome::Deleted);

    let log = s.audit_log(10).await.unwrap();
    assert_eq!(
        actions(&log),
        [
            "credential.deleted",
            "credential.attached",
            "credential.first_used",
            "credential.replaced",
            "credential.stored"
        ]
    );
    assert_eq!(log[1].actor, "cli:ann");
}

async fn a_credential_sealed_under_a_replaced_master_key_is_refused(b: &Backend) {
    let s = &b.store;
    s.put_credential(&credential("a", "mk_1"), "t", Utc::now()).await.unwrap();
    let rotated = AuditEvent::new("master_key.rotated", "mk_2", "");
    let update = Rewrapped {
        id: "cred_a".into(),
        old_master_key_id: "mk_1".into(),
        master_key_id: "mk_2".into(),
        wrapped_key: vec![9],
    };
    // A row stored under the old key after the re-wrap was computed fails the rotation, whole.
    s.put_credential(&credential("b", "mk_1"), "t", Utc::now()).await.unwrap();
    let err = s.rewrap_credentials(std::slice::from_ref(&update), "mk_2", "t", Utc::now(), &rotated).await;
    assert!(matches!(err, Err(StoreError::MasterKeyChanged { .. })), "{err:?}");
    assert_eq!(s.credential("a").await.unwrap().unwrap().master_key_id, "mk_1", "rolled back");

    let b = Rewrapped { id: "cred_b".into(), ..update };
    let a = Rewrapped {
        id: "cred_a".into(),
        old_master_key_id: "mk_1".into(),
        master_key_id: "mk_2".into(),
        wrapped_key: vec![9],
    };
    assert_eq!(s.rewrap_credentials(&[a, b], "mk_2", "t", Utc::now(), &rotated).await.unwrap(), 2);
    assert_eq!(s.current_master_key_id().await.unwrap().as_deref(), Some("mk_2"));
    // From now on a writer still holding the old key is turned away, to re-read the key file.
    let err = s.put_credential(&credential("c", "mk_1"), "t", Utc::now()).await;
    assert!(matches!(err, Err(StoreError::MasterKeyChanged { ref current }) if current == "mk_2"), "{err:?}");
    assert!(s.credential("c").await.unwrap().is_none());
}

async fn licenses_are_stored_once_and_removal_is_audited(b: &Backend) {
    let s = &b.store;
    let added = AuditEvent::new("license.added", "lic_1", "issued to Contoso");
    assert!(s.add_license("lic_1", "panel-license-v1.x.y", "cli:ann", Utc::now(), &added).await.unwrap());
    assert!(!s.add_license("lic_1", "panel-license-v1.x.y", "cli:ann", Utc::now(), &added).await.unwrap());
    assert_eq!(s.licenses().await.unwrap().len(), 1);
    assert!(s.remove_license("lic_1", "cli:bob", Utc::now()).await.unwrap());
    assert!(!s.remove_license("lic_1", "cli:bob", Utc::now()).await.unwrap());
    assert_eq!(actions(&s.audit_log(10).await.unwrap()), ["license.removed", "license.added"]);
}

contract!(
    credential_changes_are_audited_and_bump_the_secrets_generation,
    a_credential_sealed_under_a_replaced_master_key_is_refused,
    licenses_are_stored_once_and_removal_is_audited
);
