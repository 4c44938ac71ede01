//! Starts the lab and prints its ports until Ctrl-C: `cargo run -p panel-testlab --example lab`.
fn main() {
    let lab = panel_testlab::PostfixLab::start().expect("postfix installed");
    println!(
        "plain {} submission {} smtps {} ca {} sha256 {}",
        lab.plain_port,
        lab.submission_port,
        lab.smtps_port,
        lab.ca_file.display(),
        lab.cert_sha256
    );
    println!("maildir {}", lab.maildir().display());
    std::thread::sleep(std::time::Duration::from_secs(u64::MAX / 4));
}
