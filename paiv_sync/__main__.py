from paiv_sync.cli import main

raise SystemExit(main())
