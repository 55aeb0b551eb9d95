"""``python -m llm_gateway`` is the same as the ``kong-llm-gateway`` command."""

from llm_gateway.cli import main

raise SystemExit(main())
