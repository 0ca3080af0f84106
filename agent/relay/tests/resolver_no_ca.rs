//! A resolver builds on a machine without CA certificates (a minimal
//! container image): hickory's DNS-over-TLS support, switched on in the
//! build by mail-auth, must not make it load the system's roots. Its own
//! process, since it changes the environment.

#[test]
fn a_resolver_builds_without_system_ca_certificates() {
    // SAFETY: this test binary has one test, and nothing else reads the
    // environment while it runs.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", "/nonexistent/ca.pem");
        std::env::set_var("SSL_CERT_DIR", "/nonexistent");
    }
    let nameservers = ["127.0.0.1:53".parse().unwrap()];
    smtpgate_relay::resolver_builder(&nameservers)
        .expect("a builder")
        .build()
        .expect("a resolver, without any CA certificate");
    // What it guards against: without its own TLS config, hickory fails.
    let plain = hickory_resolver::TokioResolver::builder_with_config(
        hickory_resolver::config::ResolverConfig::default(),
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    )
    .build();
    assert!(
        plain.is_err(),
        "hickory built without roots on its own: the guard tests nothing"
    );
}
