//! Every message type a node decodes from a peer (calls, answers, casts, stream opens and
//! stream items of the queen's, the hive's and the worker's protocols), from arbitrary
//! bytes: each decode is a value or a typed error, and a decoded value encodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbee_actors::hive::remote::HiveProtocol;
use rbee_actors::queen::protocol::QueenProtocol;
use rbee_actors::worker::remote::WorkerProtocol;
use rbee_transport::Protocol;
use rbee_transport::codec::{decode_payload, encode_frame};

fn each_type<P: Protocol>(data: &[u8]) {
    fn one<T: serde::Serialize + serde::de::DeserializeOwned>(data: &[u8]) {
        if let Ok(value) = decode_payload::<T>(data) {
            encode_frame(&value, 1 << 30).expect("a decoded message encodes");
        }
    }
    one::<P::Request>(data);
    one::<P::Response>(data);
    one::<P::Event>(data);
    one::<P::Open>(data);
    one::<P::Item>(data);
}

fuzz_target!(|data: &[u8]| {
    each_type::<QueenProtocol>(data);
    each_type::<HiveProtocol>(data);
    each_type::<WorkerProtocol>(data);
});
