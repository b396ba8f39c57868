from modalign.cli import main

raise SystemExit(main())
