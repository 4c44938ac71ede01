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
