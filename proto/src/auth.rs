//! The per-job secret: every RPC carries `authorization: Bearer <secret>`; the server
//! compares it in constant time. The secret never shows in `Debug` output or logs.

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

const HEADER: &str = "authorization";
const SCHEME: &str = "Bearer ";
const MAX_SECRET_LEN: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the job secret is empty")]
    Empty,
    #[error("the job secret is longer than {MAX_SECRET_LEN} bytes")]
    TooLong,
    #[error("the job secret may only contain visible ASCII characters (no spaces)")]
    BadCharacters,
    #[error("the job secret is not UTF-8 text")]
    NotUtf8,
    #[error("cannot read the job secret from {path}: {message}")]
    File { path: String, message: String },
    #[error("both TRAINER_JOB_SECRET and TRAINER_JOB_SECRET_FILE are set; set only one")]
    Ambiguous,
}

/// The job secret. `Debug` prints `JobSecret(<redacted>)`.
#[derive(Clone)]
pub struct JobSecret(Arc<str>);

impl JobSecret {
    pub fn new(secret: &str) -> Result<Self, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::Empty);
        }
        if secret.len() > MAX_SECRET_LEN {
            return Err(AuthError::TooLong);
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::BadCharacters);
        }
        Ok(Self(secret.into()))
    }

    /// Reads the secret from a file, such as a mounted Kubernetes Secret. One trailing
    /// newline (`\n` or `\r\n`) is trimmed, since `echo` and editors add one.
    pub fn from_file(path: &std::path::Path) -> Result<Self, AuthError> {
        let file_error = |message: String| AuthError::File { path: path.display().to_string(), message };
        let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
        Self::from_file_contents(&bytes).map_err(|e| file_error(e.to_string()))
    }

    /// The secret from the bytes of a secret file: UTF-8 text, less one trailing newline
    /// (`\n` or `\r\n`), then checked as [`JobSecret::new`] checks it. The entry point of
    /// the fuzz target `auth_metadata`.
    pub fn from_file_contents(bytes: &[u8]) -> Result<Self, AuthError> {
        let text = std::str::from_utf8(bytes).map_err(|_| AuthError::NotUtf8)?;
        let text = text.strip_suffix('\n').map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
        Self::new(text)
    }

    /// The secret from the environment: `TRAINER_JOB_SECRET`, or the file that
    /// `TRAINER_JOB_SECRET_FILE` names; `Ok(None)` when neither is set (or both are empty).
    pub fn from_env() -> Result<Option<Self>, AuthError> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        match (var(crate::JOB_SECRET_ENV), var(crate::JOB_SECRET_FILE_ENV)) {
            (Some(_), Some(_)) => Err(AuthError::Ambiguous),
            (Some(value), None) => Self::new(&value.to_string_lossy()).map(Some),
            (None, Some(path)) => Self::from_file(std::path::Path::new(&path)).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The secret itself, for handing it to a child process's environment. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison (the length is not hidden, the content is).
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.as_bytes().ct_eq(presented))
    }

    fn header_value(&self) -> MetadataValue<Ascii> {
        // new() admits only visible ASCII, which is always a valid header value.
        let mut value = MetadataValue::try_from(format!("{SCHEME}{}", self.0))
            .unwrap_or_else(|_| MetadataValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

impl fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobSecret(<redacted>)")
    }
}

impl std::str::FromStr for JobSecret {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Client side: adds the secret to every request.
#[derive(Clone)]
pub struct ClientAuth {
    value: MetadataValue<Ascii>,
}

impl ClientAuth {
    pub fn new(secret: &JobSecret) -> Self {
        Self { value: secret.header_value() }
    }
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientAuth(<redacted>)")
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(HEADER, self.value.clone());
        Ok(request)
    }
}

/// Server side: refuses a request without the right secret with UNAUTHENTICATED.
#[derive(Clone)]
pub struct ServerAuth {
    secret: JobSecret,
}

impl ServerAuth {
    pub fn new(secret: JobSecret) -> Self {
        Self { secret }
    }

    pub fn check(&self, request: &Request<()>) -> Result<(), Status> {
        self.check_value(request.metadata().get(HEADER).map(MetadataValue::as_bytes))
    }

    /// Checks the value of a request's `authorization` metadata (`None` when it has none):
    /// it must be `Bearer <secret>`. The entry point of the fuzz target `auth_metadata`; the
    /// error never contains the secret.
    pub fn check_value(&self, value: Option<&[u8]>) -> Result<(), Status> {
        let value = value.ok_or_else(|| {
            Status::unauthenticated("missing job secret: send metadata `authorization: Bearer <secret>`")
        })?;
        let presented = value
            .strip_prefix(SCHEME.as_bytes())
            .ok_or_else(|| Status::unauthenticated("the authorization metadata must be `Bearer <secret>`"))?;
        if self.secret.matches(presented) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong job secret"))
        }
    }
}

impl fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerAuth(<redacted>)")
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_checked_and_never_printed() {
        let secret = JobSecret::new("s3cr3t-token").unwrap();
        assert!(!format!("{secret:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", ClientAuth::new(&secret)).contains("s3cr3t"));
        let server = ServerAuth::new(secret.clone());

        let good = ClientAuth::new(&secret).call(Request::new(())).unwrap();
        assert!(server.check(&good).is_ok());

        let missing = server.check(&Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);

        let other = JobSecret::new("s3cr3t-tokeN").unwrap();
        let wrong = ClientAuth::new(&other).call(Request::new(())).unwrap();
        let e = server.check(&wrong).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.message().contains("s3cr3t"));

        let mut no_scheme = Request::new(());
        no_scheme.metadata_mut().insert(HEADER, MetadataValue::from_static("s3cr3t-token"));
        assert_eq!(server.check(&no_scheme).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn a_secret_file_loses_one_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        for (content, expected) in [("abc\n", "abc"), ("abc", "abc"), ("abc\r\n", "abc")] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(JobSecret::from_file(&path).unwrap().expose(), expected, "{content:?}");
        }
        // Two newlines: only one goes, and the second makes it a bad secret, said clearly.
        std::fs::write(&path, "abc\n\n").unwrap();
        let e = JobSecret::from_file(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()) && e.contains("visible ASCII"), "{e}");
        let missing = JobSecret::from_file(&dir.join("missing")).unwrap_err().to_string();
        assert!(missing.contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn cases() -> ProptestConfig {
            ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() }
        }

        proptest! {
            #![proptest_config(cases())]

            /// The bounded counterpart of the fuzz target `auth_metadata` (secret files).
            #[test]
            fn any_secret_file_is_a_secret_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
                match JobSecret::from_file_contents(&bytes) {
                    Ok(secret) => {
                        let s = secret.expose().as_bytes();
                        prop_assert!(!s.is_empty() && s.len() <= MAX_SECRET_LEN);
                        prop_assert!(s.iter().all(u8::is_ascii_graphic));
                        let trimmed = bytes.strip_suffix(b"\n").map_or(&bytes[..], |t| t.strip_suffix(b"\r").unwrap_or(t));
                        prop_assert_eq!(s, trimmed);
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }

            /// The bounded counterpart of the fuzz target `auth_metadata` (metadata values):
            /// only `Bearer <the secret>` passes, and no error repeats the secret.
            #[test]
            fn only_the_bearer_secret_passes(
                secret in "[!-~]{1,40}",
                value in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..80),
                    "[!-~]{0,40}".prop_map(|s| format!("Bearer {s}").into_bytes()),
                ],
                as_metadata in any::<bool>(),
            ) {
                let auth = ServerAuth::new(JobSecret::new(&secret).map_err(|e| TestCaseError::fail(e.to_string()))?);
                let expected = value == format!("Bearer {secret}").into_bytes();
                let result = if as_metadata {
                    // What tonic hands the interceptor: only valid header values get that far.
                    let Ok(v) = MetadataValue::<Ascii>::try_from(value.as_slice()) else { return Ok(()) };
                    let mut request = Request::new(());
                    request.metadata_mut().insert(HEADER, v);
                    auth.check(&request)
                } else {
                    auth.check_value(Some(&value))
                };
                prop_assert_eq!(result.is_ok(), expected);
                if let Err(e) = result {
                    prop_assert_eq!(e.code(), tonic::Code::Unauthenticated);
                    prop_assert!(!e.message().contains(&secret) || secret.len() < 4, "{}", e.message());
                }
            }
        }
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert_eq!(JobSecret::new("").unwrap_err(), AuthError::Empty);
        assert_eq!(JobSecret::new("a b").unwrap_err(), AuthError::BadCharacters);
        assert_eq!(JobSecret::new(&"x".repeat(600)).unwrap_err(), AuthError::TooLong);
    }
}
