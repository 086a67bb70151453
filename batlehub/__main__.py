from batlehub.cli import main

raise SystemExit(main())
