"""Benchmark corpus builders: label-conditioned phantom radiographs and CT volumes.

``synth-cxr`` pairs each real IU report with PA and lateral phantoms drawn from its
MeSH findings; ``synth-wrist`` draws wrist radiographs with distal radius / ulna /
ulnar styloid fractures and region boxes; ``synth-ct`` writes chest CT volumes in HU
with organ z-ranges and organ-wise report sentences. Every builder is deterministic
by seed: the same seed gives byte-identical files.
"""
