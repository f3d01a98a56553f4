// Package spool is relaycar's durable queue: a message is on disk and
// synced before the client hears 250, and stays there until it is
// delivered, dead-lettered with its reason, or dropped by an operator.
//
// # Layout
//
//	<dir>/<id>.msg              a live message: header, body, records (0600)
//	<dir>/dead/<id>.msg         a dead letter, same format, state says why
//	<dir>/.tmp-<id>.msg         a compaction or migration in progress
//	<dir>/.free-<x>             a pool file: a delivered message's file kept for
//	                            reuse, or a message written over it (placed)
//	<dir>/<id>.msg.broken       a damaged entry, kept for a human (also in dead/)
//	<dir>/.lock                 flock of the serving process
//	<dir>/<id>.{eml,json}       format v1, migrated by Load (also in dead/)
//
// Directories are 0700. Ids are time-sortable, so names sort by age.
//
// # Format, version 2
//
// A .msg file is a 64-byte header, the body, then records:
//
//	header  "RCSPOOL", version byte (2), body offset, body length,
//	        body CRC-32C, reserved, CRC-32C of the header
//	body    the message exactly as it will be delivered
//	record  [u32 length][u32 CRC-32C of length, type, payload][u8 type][payload]
//	        type 1: envelope, JSON of Envelope: the last valid one is the state
//	        type 2: done: delivered, the file is garbage
//
// Scanning stops at the first torn or invalid record: records are
// appended without a sync of their own, so a bad one can only be an
// unsynced tail, and the state before it is one the spool did write. The
// next append overwrites the tail. A file without a valid header, with a
// body that fails its CRC, or without an envelope record was never
// acknowledged or was damaged: Load quarantines it.
//
// # Writes and syncs
//
// "syncfs" is one syncfs(2) of the spool's file system through
// atomicfile.GroupSync: concurrent callers share it (group commit). It
// also writes out what other processes wrote to that file system, so the
// spool logs a warning when its syncs are slow for what it wrote itself
// (syncwatch.go): the cure is a file system of the spool's own.
//
// In the table <id>.msg stands for the message's file, which is its pool
// file while it is placed there (see Reused files).
//
//	operation         what is written, in order                              what is synced
//	Create, Write     a ready .free-<x>, opened to write over in place; or   nothing
//	                  O_EXCL <id>.msg when the pool has none; placeholder
//	                  header; body through a 64 KiB buffer
//	Commit            rest of the body; envelope record; header (pwrite at   syncfs, then 250; in place and
//	                  0) with body length and CRC; in place, nothing more:   alone: fdatasync, then 250
//	                  the message stays in the pool file (placed)
//	Abort             unlink <id>.msg, or the .free-<x> written over         nothing; syncfs after a commit whose
//	                                                                         fdatasync succeeded (then failed)
//	Update            envelope record after the last valid one               nothing: a lost state repeats an attempt
//	Update, records   .tmp-<id>.msg: header, body copy, envelope record;     fsync of the temp file before the rename
//	over 64 KiB       rename over <id>.msg
//	Remove            done record, and for a placed message a placeholder    nothing: a lost done resends (at-least-once)
//	                  header over its own (its pool file then reads as
//	                  free by its contents); the reaper later renames
//	                  <id>.msg to .free-<id> (files up to 64 KiB, 256 at
//	                  most), takes a placed message's pool file back as it
//	                  is, or unlinks the file
//	Close             rename placed messages to <id>.msg                     nothing: Load finds one not renamed
//	Bury              envelope record with dead_reason; rename to            fsync of the file before the rename;
//	                  dead/<id>.msg                                          syncfs after it
//	Resurrect         rename dead/<id>.msg to <id>.msg; envelope record      syncfs after the rename; syncfs after
//	                  with failed recipients pending again                   the record
//	Drop              unlink <id>.msg and dead/<id>.msg (and v1 files)       syncfs
//	Load              unlink .tmp-* and done files; adopt .free-* into the   v1 entries: syncfs after all their temp
//	                  pool, or rename one that holds a message committed     files, syncfs after all the renames,
//	                  in place to <id>.msg; rename damaged entries to        then the v1 unlinks; one syncfs at the
//	                  .broken; rename live files with a dead reason to       end (a lost unlink or rename is redone
//	                  dead/; v1 entries: .tmp-<id>.msg, rename to            by the next Load)
//	                  <id>.msg, unlink the v1 pair
//
// The hot path is Create, Write, Commit, Update and Remove: at most one
// file created per message (none once the pool has files), nothing
// unlinked on it, and once the pool has files no journal commit before
// 250 either: fdatasync of a file written over blocks it already has
// leaves the file system's metadata alone, where syncfs (or fsync) waits
// for the journal. A message written over a pool file is not renamed at all: on
// ext4 without a journal a file renamed since its last sync has its
// directory written out by the next one (ext4_sync_parent), which
// doubled the commit's fdatasync; and a rename is a directory change
// under the directory's lock, which sessions committing together would
// queue on.
//
// # Reused files
//
// A file from the pool keeps its old bytes past what the new message
// writes. They never read as the new message's: its records are chained
// to its own body's CRC and carry its id. A free file is taken only after
// two syncs since it came back (its rename, or the done record and
// placeholder of the message placed in it), so the delivered message's
// done record and the
// free name are durable before its bytes are written over; the new
// message is then written and synced under that free name and stays
// there until it is delivered (the spool keeps id -> free name in memory,
// Spool.placed), or until Close renames it to <id>.msg. Delivered, it gets
// a placeholder header besides its done record: the file's name is not
// the message's id, so its header is what says it is free, whatever part
// of the next message's writes over it a crash keeps. Load reads each
// .free-<x> by its contents: the delivered message x (its own id), a
// message marked done, a placeholder or a torn header, or an envelope
// without its header's body, are a message never acknowledged or
// delivered, and go back to the pool; a valid header, body and envelope
// of another id, not done, is a message placed there that a kill or crash
// left queued, and becomes <id>.msg; another id's header and envelope
// with a body that fails its CRC is quarantined as <id>.msg.broken, as a
// torn commit under its own name is. List reads the pool files the same
// way, so `relaycar queue ls` beside a serving relay sees placed messages.
//
// Readers (List, Dead, Get, CountDead) change nothing and are safe beside
// a serving process: they see the last complete record. Get finds a
// placed message only in the process that placed it, or after Load;
// List finds it anywhere. Everything else belongs to the process holding
// Lock.
package spool
