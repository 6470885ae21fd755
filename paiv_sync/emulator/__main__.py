from paiv_sync.emulator.cli import main

raise SystemExit(main())
