//! Sign-in under the lockout, as the web UI calls it.

use panel_domain::Secret;
use panel_service::accounts::{Role, SignIn};

use crate::harness::Harness;

const RIGHT: &str = "the-right-password-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_passwords_get_five_checks_and_the_right_one_after_them_is_refused() {
    let h = Harness::start(None, &[]).await;
    h.panel.put_admin("ann", Role::Admin, &Secret::new(RIGHT.into()), false, "test").await.unwrap();
    let client = Some("192.0.2.7".parse().unwrap());
    let guesses = (0..30).map(|i| {
        let panel = h.panel.clone();
        tokio::spawn(async move { panel.sign_in("ann", &Secret::new(format!("guess-{i}")), client).await.unwrap() })
    });
    let (mut refused, mut blocked) = (0, 0);
    for g in guesses {
        match g.await.unwrap() {
            SignIn::Refused => refused += 1,
            SignIn::Blocked { retry_after_secs } => {
                assert!((1..=900).contains(&retry_after_secs), "{retry_after_secs}");
                blocked += 1;
            }
            SignIn::Accepted { .. } => panic!("a wrong password was accepted"),
        }
    }
    assert_eq!((refused, blocked), (5, 25), "exactly five passwords were checked");
    let right = h.panel.sign_in("ann", &Secret::new(RIGHT.into()), client).await.unwrap();
    assert!(matches!(right, SignIn::Blocked { .. }), "the right password right after the burst is not checked");
    // Five guesses from one address lock that address out of this account, not the account:
    // its owner elsewhere signs in (the account-wide lock needs guesses from many addresses).
    let elsewhere = h.panel.sign_in("ann", &Secret::new(RIGHT.into()), Some("192.0.2.8".parse().unwrap())).await;
    assert!(matches!(elsewhere.unwrap(), SignIn::Accepted { .. }));
    let again = h.panel.sign_in("ann", &Secret::new(RIGHT.into()), client).await.unwrap();
    assert!(matches!(again, SignIn::Blocked { .. }), "the guessing address stays locked for its window");

    h.clock.advance(chrono::Duration::minutes(15) + chrono::Duration::seconds(1));
    let later = h.panel.sign_in("ann", &Secret::new(RIGHT.into()), client).await.unwrap();
    assert!(matches!(later, SignIn::Accepted { role: Role::Admin, .. }), "the window passed");
    h.stop().await;
}

#[tokio::test]
async fn a_setup_link_works_once_within_the_hour_and_only_while_no_account_exists() {
    let h = Harness::start(None, &[]).await;
    let password = Secret::new(RIGHT.into());
    // Unused for an hour: spent.
    let token = h.panel.open_setup().await.unwrap().expect("no account yet");
    assert!(h.panel.setup_open(&token).await.unwrap());
    assert!(!h.panel.setup_open("a-guess").await.unwrap());
    h.clock.advance(chrono::Duration::minutes(61));
    assert!(!h.panel.setup_open(&token).await.unwrap());
    let late = h.panel.finish_setup(&token, "ann", &password, None).await.err().unwrap();
    assert!(late.to_string().contains("used, expired"), "{late}");

    // A fresh one: bad input can be corrected on the same link, then it makes the account once.
    let token = h.panel.open_setup().await.unwrap().unwrap();
    let short = h.panel.finish_setup(&token, "ann", &Secret::new("short".into()), None).await.err().unwrap();
    assert!(short.to_string().contains("invalid") || short.to_string().contains("password"), "{short}");
    let signed = h.panel.finish_setup(&token, "Ann", &password, None).await.unwrap();
    assert!(matches!(signed, SignIn::Accepted { role: Role::Admin, .. }));
    assert!(h.panel.finish_setup(&token, "bob", &password, None).await.is_err(), "spent");
    assert_eq!(h.panel.admins().await.unwrap().len(), 1);
    // With an account, a restart prints no link.
    assert!(h.panel.open_setup().await.unwrap().is_none());
}
