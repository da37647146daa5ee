"""``python -m demo``: run the story (see demo/story.py)."""

import sys

from demo.story import main

sys.exit(main())
