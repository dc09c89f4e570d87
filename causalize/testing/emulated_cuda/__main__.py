"""``python -m causalize.testing.emulated_cuda -m MODULE [ARGS...]``: MODULE under the emulation."""

from causalize.testing.emulated_cuda import main

raise SystemExit(main())
