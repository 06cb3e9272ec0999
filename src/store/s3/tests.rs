//! The S3 adapter's pure parts: encoding, error summaries, ETag checks.

use super::*;
use admin::create_bucket_body;
use transport::summarize_body;

#[test]
fn copy_sources_are_percent_encoded_but_keep_slashes() {
    assert_eq!(
        percent_encode("p/cam-1/chunk-000001", b"/"),
        "p/cam-1/chunk-000001"
    );
    assert_eq!(percent_encode("a b/ü+x", b"/"), "a%20b/%C3%BC%2Bx");
    assert_eq!(percent_encode("a/b+c=d", b""), "a%2Fb%2Bc%3Dd");
    assert_eq!(
        xml_value("<R><ETag>&quot;abc-3&quot;</ETag></R>", "ETag").as_deref(),
        Some("\"abc-3\"")
    );
}

#[test]
fn a_plain_md5_etag_must_match_what_was_sent() {
    let md5 = md5::compute(b"body").0;
    let hex = hex::encode(md5);
    assert!(check_etag("k", &format!("\"{hex}\""), &md5).is_ok());
    assert!(check_etag("k", &hex.to_uppercase(), &md5).is_ok());
    let other = hex::encode(md5::compute(b"bodY").0);
    let err = check_etag("k", &format!("\"{other}\""), &md5).expect_err("mismatch");
    assert_eq!(err.kind(), "integrity");
    // Multipart and encrypted-object ETags are not MD5s: nothing to compare.
    assert!(check_etag("k", "\"abc-3\"", &md5).is_ok());
    assert!(check_etag("k", "", &md5).is_ok());
}

#[test]
fn create_bucket_sends_no_constraint_for_us_east_1_only() {
    assert_eq!(create_bucket_body("us-east-1"), "");
    assert!(
        create_bucket_body("eu-central-1")
            .contains("<LocationConstraint>eu-central-1</LocationConstraint>")
    );
}

#[test]
fn error_bodies_are_summarized() {
    let xml = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>bad sig</Message></Error>";
    assert_eq!(summarize_body(xml), "SignatureDoesNotMatch: bad sig");
    assert_eq!(summarize_body("plain"), "plain");
}

#[test]
fn answers_and_transport_errors_are_classified() {
    use std::io;
    use std::time::Duration;
    let config = S3Config {
        endpoint: Some("https://127.0.0.1:1".into()),
        region: "us-east-1".into(),
        bucket: "b".into(),
        prefix: String::new(),
        path_style: true,
        request_timeout: Duration::from_secs(1),
        credentials: None,
        create_bucket: true,
        content_md5: crate::config::ContentMd5::Auto,
        anonymous: false,
        chain: Default::default(),
        policy: Default::default(),
        tls: Default::default(),
    };
    let answer = |status: u16, body: &str| transport::Answer {
        status,
        headers: HeaderMap::new(),
        body: body.as_bytes().to_vec(),
    };
    let kind = |answer: transport::Answer| answer.success("k").err().map(|err| err.kind());
    assert_eq!(kind(answer(200, "")), None);
    assert_eq!(kind(answer(503, "busy")), Some("http_5xx"));
    assert_eq!(kind(answer(403, "no")), Some("http_4xx"));
    let bad_digest = "<Error><Code>BadDigest</Code><Message>m</Message></Error>";
    assert_eq!(kind(answer(400, bad_digest)), Some("integrity"));
    let error_document = "<Error><Code>InternalError</Code><Message>m</Message></Error>";
    let err = answer(200, error_document)
        .document("k")
        .expect_err("an error");
    assert_eq!(err.kind(), "http_5xx");
    assert_eq!(
        answer(200, "<R/>").document("k").ok().as_deref(),
        Some("<R/>")
    );
    let refused = ureq::Error::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
    assert_eq!(
        transport::map_ureq_error(refused, &config, "k").kind(),
        "connect"
    );
    let untrusted = ureq::Error::Rustls(rustls::Error::InvalidCertificate(
        rustls::CertificateError::UnknownIssuer,
    ));
    let err = transport::map_ureq_error(untrusted, &config, "k");
    assert_eq!(err.kind(), "tls");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(err.to_string().contains("https://127.0.0.1:1"), "{err}");
}
