import sys

from streamtrain.cli import main

sys.exit(main())
