"""Running models the way they are deployed: ONNX export, ONNX Runtime sessions, latency and parity.

Library code shared by the stages that measure a deliverable (editor, compression, validation), so that
every stage times and checks an exported model the same way."""
