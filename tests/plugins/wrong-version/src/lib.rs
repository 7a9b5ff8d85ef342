//! Test plugin `wrong-version`: a well-behaved placement (hosts in input order) built against
//! `strata:plugin@0.2.0` instead of `@0.1.0`, without the SDK.
//!
//! The component imports `strata:plugin/log@0.2.0` (every export logs, so the import is kept)
//! and exports `init`, `place` and `rebalance` with the 0.1.0 shapes. A 0.1.0 host has no such
//! import to offer, so it must refuse the component when linking or instantiating it.

// The generated bindings need `unsafe`; this crate has no other.
#![deny(unsafe_code)]

#[allow(missing_docs, unsafe_code, clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        inline: r#"
            package strata:plugin@0.2.0;

            interface log {
                enum level { trace, debug, info, warn, error }
                log: func(level: level, message: string);
            }

            interface placement-types {
                record host-info { id: string, free-bytes: u64, capacity-bytes: u64 }
                record chunk-ref { space: string, name: string }
                record chunk-placement { chunk: chunk-ref, size: u64, hosts: list<string> }
                record membership-change {
                    before: list<host-info>,
                    after: list<host-info>,
                    chunks: list<chunk-placement>,
                }
                record chunk-move { chunk: chunk-ref, %from: string, to: string, to-alpha: bool }
            }

            world placement {
                import log;
                use placement-types.{chunk-ref, host-info, membership-change, chunk-move};

                export init: func(config: string) -> result<_, string>;
                export place: func(chunk: chunk-ref, size: u64, hosts: list<host-info>)
                    -> result<list<string>, string>;
                export rebalance: func(change: membership-change) -> result<list<chunk-move>, string>;
            }
        "#,
        world: "placement",
    });
}

// The export macro expands to `unsafe extern "C"` functions.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod component {
    use super::bindings::strata::plugin::log::{log, Level};
    use super::bindings::strata::plugin::placement_types::{
        ChunkMove, ChunkRef, HostInfo, MembershipChange,
    };

    struct WrongVersion;

    impl super::bindings::Guest for WrongVersion {
        fn init(config: String) -> Result<(), String> {
            log(
                Level::Info,
                &format!("wrong-version (0.2.0) init: {config}"),
            );
            Ok(())
        }

        fn place(
            _chunk: ChunkRef,
            _size: u64,
            hosts: Vec<HostInfo>,
        ) -> Result<Vec<String>, String> {
            log(Level::Debug, "wrong-version (0.2.0) place");
            Ok(hosts.into_iter().map(|h| h.id).collect())
        }

        fn rebalance(_change: MembershipChange) -> Result<Vec<ChunkMove>, String> {
            log(Level::Debug, "wrong-version (0.2.0) rebalance");
            Ok(Vec::new())
        }
    }

    super::bindings::export!(WrongVersion with_types_in super::bindings);
}
