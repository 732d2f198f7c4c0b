//! The job secret as a secret file holds it, and the `authorization` metadata of a request
//! (`JobSecret::from_file_contents`, `ServerAuth::check_value`, and `ServerAuth::check` on a
//! real tonic request when the bytes are a valid header value). Only `Bearer <secret>`
//! passes; no error repeats the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tonic::metadata::{Ascii, MetadataValue};
use trainer_proto::{JobSecret, ServerAuth};

const SECRET: &str = "fuzz-job-secret-0123";

fuzz_target!(|data: &[u8]| {
    if let Ok(secret) = JobSecret::from_file_contents(data) {
        assert!(secret.expose().bytes().all(|b| b.is_ascii_graphic()));
    }
    let Ok(secret) = JobSecret::new(SECRET) else { return };
    let auth = ServerAuth::new(secret);
    let expected = data == format!("Bearer {SECRET}").as_bytes();
    let checked = auth.check_value(Some(data));
    assert_eq!(checked.is_ok(), expected);
    if let Err(e) = checked {
        assert!(!e.message().contains(SECRET));
    }
    if let Ok(value) = MetadataValue::<Ascii>::try_from(data) {
        let mut request = tonic::Request::new(());
        request.metadata_mut().insert("authorization", value);
        assert_eq!(auth.check(&request).is_ok(), expected);
    }
});
