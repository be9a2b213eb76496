//! The payment header decoder: any bytes a client can put in `PAYMENT-SIGNATURE`.
//! It must return a value or an error, never panic; what it accepts must survive
//! a re-encode and decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x402_proto::wire::{decode_payment, encode_header};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(checked) = decode_payment(text) {
        let again = decode_payment(&encode_header(&checked.payload));
        assert!(again.is_ok(), "a decoded payment does not decode again");
    }
});
