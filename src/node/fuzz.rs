//! Fuzzing the node's decoders of outside bytes: its configuration file ([`NodeConfig::parse`],
//! which reads `[consensus]` through `ConsensusConfig::from_toml_str` and `[http]`), the bodies
//! and signature headers of HTTP requests, and the key-value commands of committed entries
//! (which a faulty leader or client may fill with anything). Inputs are built from the real
//! keys and shapes with random values of every TOML type, then damaged at random. Each must parse
//! or give a typed error, never panic.

use axum::http::{HeaderMap, HeaderValue, Uri};
use proptest::prelude::*;

use super::http::{CLIENT_KEY_HEADER, CLIENT_SIGNATURE_HEADER, CasRequest, signature_of};
use super::kv::KvCommand;
use super::*;
use crate::fuzzing::config;

const CONSENSUS_KEYS: [&str; 28] = [
    "algorithm",
    "node_id",
    "bind_address",
    "bootstrap_peers",
    "min_cluster_size",
    "election_timeout_ms",
    "heartbeat_interval_ms",
    "request_timeout_ms",
    "gpu_enabled",
    "gpu_device_id",
    "gpu_memory_pool_mb",
    "state_dir",
    "snapshot_interval",
    "byzantine_fault_tolerance",
    "byzantine_threshold",
    "batch_size",
    "batch_timeout_ms",
    "max_batch_bytes",
    "disk_reserve_mb",
    "enable_batching",
    "priority_based",
    "view_change_timeout_ms",
    "checkpoint_interval",
    "key_file",
    "client_keys",
    "insecure_plaintext",
    "no_such_key",
    "validators",
];

/// A TOML value of any type, with the edge values of each.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop_oneof![
            Just(i64::MAX),
            Just(i64::MIN),
            Just(0),
            Just(-1),
            Just(1),
            any::<i64>(),
            0..100_000i64
        ]
        .prop_map(|number| number.to_string()),
        prop_oneof![
            Just("nan".to_owned()),
            Just("inf".to_owned()),
            Just("-inf".to_owned()),
            Just("1e308".to_owned()),
            Just("-0.0".to_owned()),
            any::<f64>().prop_map(|number| format!("{number:?}")),
        ],
        any::<bool>().prop_map(|value| value.to_string()),
        prop_oneof![
            Just("raft".to_owned()),
            Just("pbft".to_owned()),
            Just("gpu_optimized_raft".to_owned()),
            Just("127.0.0.1:7000".to_owned()),
            Just("node-2@127.0.0.1:7001".to_owned()),
            Just("@:".to_owned()),
            Just("[::1]:99999".to_owned()),
            "[a-z0-9@:.\\-\\[\\]]{0,24}",
            "\\PC{0,12}",
        ]
        .prop_map(|text| format!("{text:?}")),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(", "))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|pairs| {
                let fields: Vec<String> = pairs
                    .into_iter()
                    .map(|(key, value)| format!("{key} = {value}"))
                    .collect();
                format!("{{ {} }}", fields.join(", "))
            }),
        ]
    })
}

/// A configuration document: `[consensus]` (sometimes missing) with random keys and values,
/// sometimes `[consensus.validators]`, `[consensus.tls]` and `[http]` (with `tls`).
fn document() -> impl Strategy<Value = String> {
    (
        prop::option::of(prop::collection::vec(
            (
                prop_oneof![Just("cert"), Just("key"), Just("ca"), Just("crt")],
                prop_oneof![Just("\"/nonexistent/x.pem\"".to_owned()), toml_value()],
            ),
            0..4,
        )),
        prop::option::of(toml_value()),
        any::<bool>(),
        prop::collection::vec((0..CONSENSUS_KEYS.len(), toml_value()), 0..10),
        prop::option::of(prop::collection::vec(
            ("[a-z0-9\\-]{1,8}", toml_value()),
            0..3,
        )),
        prop::option::of(prop_oneof![
            Just("\"127.0.0.1:8080\"".to_owned()),
            toml_value()
        ]),
    )
        .prop_map(|(tls, http_tls, with_consensus, pairs, validators, http)| {
            let mut text = String::new();
            if with_consensus {
                text.push_str("[consensus]\n");
            }
            for (key, value) in pairs {
                text.push_str(&format!("{} = {value}\n", CONSENSUS_KEYS[key]));
            }
            if let Some(validators) = validators {
                text.push_str("[consensus.validators]\n");
                for (name, value) in validators {
                    text.push_str(&format!("{name} = {value}\n"));
                }
            }
            if let Some(tls) = tls {
                text.push_str("[consensus.tls]\n");
                for (key, value) in tls {
                    text.push_str(&format!("{key} = {value}\n"));
                }
            }
            if let Some(address) = http {
                text.push_str(&format!("[http]\naddress = {address}\n"));
                if let Some(value) = http_tls {
                    text.push_str(&format!("tls = {value}\n"));
                }
            }
            text
        })
}

/// Damage at a character boundary: a character inserted or a range removed.
fn damaged(text: &str, at: usize, inserted: Option<char>, removed: usize) -> String {
    let boundaries: Vec<usize> = text
        .char_indices()
        .map(|(index, _)| index)
        .chain([text.len()])
        .collect();
    let start = boundaries[at % boundaries.len()];
    let end = boundaries[(at % boundaries.len() + removed).min(boundaries.len() - 1)];
    let mut out = String::with_capacity(text.len() + 4);
    out.push_str(&text[..start]);
    if let Some(character) = inserted {
        out.push(character);
    }
    out.push_str(&text[end..]);
    out
}

proptest! {
    #![proptest_config(config(8_000))]

    #[test]
    fn fuzz_node_config(
        text in document(),
        damage in prop::option::of((any::<usize>(), prop::option::of(any::<char>()), 0..4usize)),
        http_override in prop::option::of("[0-9.:]{0,16}"),
    ) {
        let text = match damage {
            Some((at, inserted, removed)) => damaged(&text, at, inserted, removed),
            None => text,
        };
        match NodeConfig::parse(&text, http_override.as_deref()) {
            Ok(config) => prop_assert!(config.consensus.validate().is_ok()),
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }
}

/// A JSON value of any shape, deep ones included.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|value| value.to_string()),
        any::<i64>().prop_map(|value| value.to_string()),
        Just("1e999".to_owned()),
        "\\PC{0,8}".prop_map(|text| format!("{text:?}")),
        Just("\"\\ud800\"".to_owned()),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec(
                (prop_oneof![Just("from"), Just("to"), Just("x")], inner),
                0..4
            )
            .prop_map(|pairs| {
                let fields: Vec<String> = pairs
                    .into_iter()
                    .map(|(key, value)| format!("{key:?}:{value}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

fn header_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        "[0-9a-f]{64}",
        "[0-9a-f]{128}",
        "[0-9a-fA-FxZ ]{0,140}",
        "\\PC{0,20}",
    ])
}

proptest! {
    #![proptest_config(config(15_000))]

    #[test]
    fn fuzz_http_bodies_and_headers(
        body in prop_oneof![
            json_value().prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..64),
            (0..200usize).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()),
        ],
        key in header_text(),
        signature in header_text(),
        path in "/kv/[a-z%0-9]{0,12}(/cas)?",
    ) {
        // The CAS body: a request or serde_json's error, whatever the nesting.
        let _: Result<CasRequest, _> = serde_json::from_slice(&body);
        let mut headers = HeaderMap::new();
        for (name, value) in [(CLIENT_KEY_HEADER, &key), (CLIENT_SIGNATURE_HEADER, &signature)] {
            if let Some(value) = value.as_deref().and_then(|text| HeaderValue::from_str(text).ok()) {
                headers.insert(name, value);
            }
        }
        let uri: Uri = path.parse().expect("the pattern makes valid paths");
        match signature_of(&headers, "PUT", &uri, &body) {
            Ok(Some(signature)) => {
                prop_assert!(signature.statement.is_some());
                prop_assert!(headers.len() == 2);
            }
            Ok(None) => prop_assert!(headers.is_empty()),
            Err(answer) => prop_assert_eq!(answer.status(), axum::http::StatusCode::BAD_REQUEST),
        }
    }

    #[test]
    fn fuzz_committed_kv_commands(
        command in prop_oneof![
            (prop::collection::vec(any::<u8>(), 0..16), prop::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(key, value)| KvCommand::Put { key, value }),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(|key| KvCommand::Delete { key }),
        ],
        at in any::<usize>(),
        value in any::<u64>(),
        cut in prop::option::of(any::<usize>()),
    ) {
        // A command as the node encodes it, then a length or tag field overwritten and cut.
        let mut bytes = crate::state_machine::encode_command(&command).expect("encodes");
        let at = at % bytes.len();
        for (offset, byte) in value.to_le_bytes().iter().enumerate() {
            if let Some(slot) = bytes.get_mut(at + offset) {
                *slot = *byte;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        let mut store = super::kv::KvStore::default();
        let _ = crate::state_machine::ErasedStateMachine::apply_bytes(&mut store, &bytes);
    }
}
