//! Starts the lab and prints its ports until killed: `cargo run -p panel-testlab --example lab`.
//! `lab relay PORT` starts it relaying every message to 127.0.0.1:PORT instead: the durable peer
//! of bench/delivery.sh, which watches its queue with `postqueue -c CONF -p`.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `lab sink MS`: a recording SMTP sink that answers each message's end after MS ms, i.e. a
    // relay of bounded speed (bench/api.sh: 16 connections at 32 ms are 500 messages a second).
    if args.get(1).map(String::as_str) == Some("sink") {
        let ms = args.get(2).and_then(|p| p.parse().ok()).expect("lab sink MS");
        let sink = panel_testlab::RecordingSink::start();
        sink.set_data_reply_delay(std::time::Duration::from_millis(ms));
        println!("sink {}", sink.port);
        return wait_for_signal();
    }
    let lab = match args.get(1).map(String::as_str) {
        Some("relay") => {
            let port = args.get(2).and_then(|p| p.parse().ok()).expect("lab relay PORT");
            panel_testlab::PostfixLab::start_relaying_to(port)
        }
        _ => panel_testlab::PostfixLab::start(),
    }
    .expect("postfix installed");
    println!(
        "plain {} submission {} smtps {} ca {} sha256 {}",
        lab.plain_port,
        lab.submission_port,
        lab.smtps_port,
        lab.ca_file.display(),
        lab.cert_sha256
    );
    println!("maildir {}", lab.maildir().display());
    println!("conf {}", lab.config_dir().display());
    // Until SIGINT or SIGTERM; then the lab is dropped, which stops its Postfix.
    wait_for_signal();
    drop(lab);
}

fn wait_for_signal() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    });
}
