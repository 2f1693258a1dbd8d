import sys

from pymllm_fx.cli import main

sys.exit(main())
