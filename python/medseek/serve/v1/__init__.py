"""Generated gRPC code of medseek.v1 (see medseek.serve.codegen)."""
