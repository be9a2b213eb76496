//! The filter configuration compiler: any bytes as the plugin JSON. A config is
//! either compiled or refused with an error naming a field; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x402_filter::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = Config::from_json(data) {
        let _ = e.to_string();
    }
});
