//! Config TOML (`JobConfig::from_toml_str`): a config file, or the job config a coordinator
//! sends its workers. Any text gives a config or a one-line error; a config that validates
//! comes back unchanged from its own TOML.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use trainer_core::JobConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match JobConfig::from_toml_str(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            if config.validate().is_ok() {
                let back = JobConfig::from_toml_str(&config.to_toml(), Path::new("again.toml"));
                assert_eq!(back.ok(), Some(config));
            }
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "a multi-line error: {e}"),
    }
});
