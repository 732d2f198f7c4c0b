//! TLS on the gRPC channel, with a CA and certificates that this test makes (rcgen): a
//! client that trusts the CA gets health and the job; a plaintext client and a client that
//! trusts another CA are refused; workers given the CA train a whole job; a worker given
//! another CA exits 3 at once instead of retrying for its connect timeout.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use common::*;

const SECRET: &str = "tls-test-secret-7a7a7a";

struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A CA, a server certificate it signs for localhost and 127.0.0.1, and an unrelated CA.
fn pki(dir: &Path) -> Pki {
    let ca_issuer = ca("imdb-ddp test CA");
    let other = ca("another CA");
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca_issuer).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: write("ca.crt", ca_issuer.pem()),
        other_ca: write("other-ca.crt", other.pem()),
        cert: write("tls.crt", cert.pem()),
        key: write("tls.key", key.serialize_pem()),
    }
}

async fn health(url: &str, ca: Option<&Path>) -> Result<i32, String> {
    let mut endpoint = Channel::from_shared(url.to_string()).unwrap().connect_timeout(Duration::from_secs(5));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).unwrap();
        endpoint =
            endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))).unwrap();
    }
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|s| format!("{s:?}"))?;
    Ok(reply.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_admits_clients_that_trust_the_ca_and_refuses_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let cert = pki.cert.display().to_string();
    let key = pki.key.display().to_string();
    let mut coord = trainer_tests::ExternalCoordinator::start(
        &bin("coordinator"),
        1,
        SECRET,
        (40, 10),
        &[
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--register-timeout",
            "60",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    let port = coord.addr().rsplit(':').next().unwrap().to_string();

    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{port}");
        assert_eq!(health(&url, Some(&pki.ca)).await, Ok(ServingStatus::Serving as i32), "{url}");
    }
    // Plaintext to a TLS server: refused.
    let plain = health(&format!("http://127.0.0.1:{port}"), None).await;
    assert!(plain.is_err(), "a plaintext client got {plain:?}");
    // A client that trusts another CA: the handshake fails.
    let other = health(&format!("https://127.0.0.1:{port}"), Some(&pki.other_ca)).await;
    assert!(other.is_err(), "a client trusting another CA got {other:?}");

    // A worker that trusts another CA stops at once with the authentication code.
    let start = Instant::now();
    let out = Command::new(bin("worker"))
        .args(["join", "--connect-timeout", "60"])
        .env("COORDINATOR_ADDR", format!("127.0.0.1:{port}"))
        .env("TRAINER_JOB_SECRET", SECRET)
        .env("TRAINER_TLS_CA", &pki.other_ca)
        .env_remove("TRAINER_JOB_SECRET_FILE")
        .env_remove("JOB_COMPLETION_INDEX")
        .output()
        .unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    assert!(text.contains("not trusted") && text.contains("certificate"), "{text}");
    coord.kill();
}

/// `coordinator --workers 2` with TLS: the local workers get the CA and dial https://.
#[test]
fn a_job_trains_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let data = trainer_tests::write_synthetic_corpus(dir.path(), 40, 10);
    let out_dir = dir.path().join("run");
    let marker = format!("tls-{}", std::process::id());
    let out = scrubbed(Command::new(bin("coordinator")), &marker)
        .args(["--workers", "2", "--no-cache", "--batch-size", "4", "--epochs", "1", "--device", "cpu"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out_dir)
        .arg("--worker-bin")
        .arg(bin("worker"))
        .arg("--tls-cert")
        .arg(&pki.cert)
        .arg("--tls-key")
        .arg(&pki.key)
        .arg("--tls-ca")
        .arg(&pki.ca)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("tls=true"), "{}", stderr(&out));
    let s = summary(&out_dir);
    assert_eq!(s["world_size"], 2, "{s}");
    assert_none_left(&marker);

    // With TLS, local workers need the CA: refused before anything starts.
    let out = scrubbed(Command::new(bin("coordinator")), &marker)
        .args(["--workers", "2", "--no-cache"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("run2"))
        .arg("--tls-cert")
        .arg(&pki.cert)
        .arg("--tls-key")
        .arg(&pki.key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--tls-ca"), "{}", stderr(&out));
}
