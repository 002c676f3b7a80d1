"""`python -m siglip_fair`: see siglip_fair/cli.py."""
import sys

from siglip_fair.cli import main

sys.exit(main())
