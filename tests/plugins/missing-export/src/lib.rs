//! Test plugin `missing-export`: claims the `placement` world of `strata:plugin@0.1.0` but
//! exports only `init` — no `place`, no `rebalance` — and imports nothing. A host must refuse
//! it when it looks up the exports (type-checking or instantiating `placement`).

// The generated bindings need `unsafe`; this crate has no other.
#![deny(unsafe_code)]

#[allow(missing_docs, unsafe_code, clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        inline: r#"
            package strata:plugin@0.1.0;

            world placement {
                export init: func(config: string) -> result<_, string>;
            }
        "#,
        world: "placement",
    });
}

// The export macro expands to `unsafe extern "C"` functions.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod component {
    struct InitOnly;

    impl super::bindings::Guest for InitOnly {
        fn init(_config: String) -> Result<(), String> {
            Ok(())
        }
    }

    super::bindings::export!(InitOnly with_types_in super::bindings);
}
