//! Feeds arbitrary bytes to what a receiver does with a transfer stream's first frame before it
//! writes any body byte: decode the [`TransferHeader`], validate its fields, and parse a blob
//! transfer's name (`blob:<hex>:<offset>`).
//!
//! Checks: no panic, no huge allocation, a header that passes validation re-encodes to itself,
//! and a name that parses names exactly the blob and offset it was built from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ragd_shared::blobs::parse_transfer_name;
use ragd_shared::codec::{decode_frame, encode_frame};
use ragd_shared::transfer::{validate_header, TransferHeader, MAX_NAME_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok((header, _)) = decode_frame::<TransferHeader>(data) {
        if validate_header(&header).is_ok() {
            assert!(header.name.len() <= MAX_NAME_LEN);
            let frame = encode_frame(&header).expect("a valid header re-encodes");
            let (again, _) = decode_frame::<TransferHeader>(&frame).expect("and decodes");
            assert_eq!(again, header);
        }
        check_name(&header.name);
    }
    // The name parser on its own, for inputs that are not frames.
    if let Ok(name) = std::str::from_utf8(data) {
        check_name(name);
    }
});

fn check_name(name: &str) {
    if let Ok((blob, offset)) = parse_transfer_name(name) {
        let rebuilt = format!("blob:{}:{offset}", blob.to_hex());
        let (b2, o2) = parse_transfer_name(&rebuilt).expect("a rebuilt name parses");
        assert_eq!((b2, o2), (blob, offset));
    }
}
