// Package config is the bridge configuration file of `cellbridge run
// -config FILE`: its schema, strict decoding, defaults, validation and the
// conversion into what the packages below take (bridge.Config,
// dedupe.MemoryConfig, dedupe.KVConfig, the limits of sources and sinks).
//
// Load reads a file, decodes it strictly (unknown fields, wrong types and
// duplicate keys are errors), expands ${ENV} references, reads file:
// secrets, applies the defaults table and validates; every problem comes
// back at once in Errors, each as "file:line: field: message". Default is
// the built-in configuration (the embedded default); WriteDefaults prints
// the defaults table that docs/configuration.md copies.
//
// Each bound is written once. The pipeline's fields are bounded by
// bridge.Config.Validate, whose field errors this package locates in the
// file; a broker's settings by its kind.
//
// Broker kinds are not named here: each kind registers its settings struct,
// their validation and the rule endpoints it serves (RegisterBrokerKind;
// package internal/app registers nats and rocketmq). The decoder picks the
// kind from a broker's `type:` and decodes the other fields into that
// kind's settings. Only the embedded default and the jetstream dedupe store
// know the kind of their broker, NATSType.
//
// A Config is read-only once built, except for the overrides a command line
// makes (OverrideRules, OverrideHTTPListen: passed to Load, so that they are
// validated in place of the file's values; KeepHTTPListen) before it is used.
package config
