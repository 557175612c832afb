#!/usr/bin/env node
// Follows one shape with the official TypeScript client's ShapeStream and reports what it
// sees, so tests/official_client.rs can compare it with shapesync's Rust client.
//
//   node follow.mjs --url http://127.0.0.1:PORT/v1/shape --param table=items
//                   [--param where=...] [--json-param 'columns=["id","Title"]']
//                   [--json-param 'params={"1":"10"}'] [--sse] [--until-offset 24008200_4]
//                   [--log changes_only] [--offset now]
// `--param` values are strings; `--json-param` values are JSON (columns as an array, which
// the client quotes; where-clause params as an object).
//
// Output: one JSON object per line on stdout.
//   {"type":"batch","handle":…,"offset":…,"messages":[…]}   one per subscriber callback
//       a change:  {"kind":"change","op":"insert","key":…,"value":{column: text|null},
//                   "lsn":"24008184"|null,"op_position":0|null}   (log changes carry both)
//                  plus "old_value":{column: text|null} when the message has one (replica=full)
//       a control: {"kind":"control","control":"up-to-date", …other headers}
//       an event:  {"kind":"event","event":"move-out", …other headers,
//                   "deleted":[keys]}   (the rows the move-out removed, see `moveOut`)
//   {"type":"rows","rows":{key:{column: text|null}}}          the materialised rows, at the end
//   {"type":"retry","status":…,"message":…}                   a transient error; retrying
//   {"type":"error","message":…}                              the stream failed (exit 1)
// `offset` and `handle` are `stream.lastOffset` / `stream.shapeHandle` when the batch is
// delivered. Values are compared as text: see `text()` below.
//
// Stops (prints the rows and exits 0) when stdin closes (the Rust test closes it), or after
// an up-to-date batch whose offset is `--until-offset`.

import { FetchError, ShapeStream, isChangeMessage, isControlMessage } from '@electric-sql/client'

function usage(message) {
  process.stderr.write(`follow.mjs: ${message}\n`)
  process.exit(2)
}

const args = process.argv.slice(2)
const params = {}
let url
let sse = false
let untilOffset
let log
let offset
for (let i = 0; i < args.length; i++) {
  const arg = args[i]
  const value = () => {
    if (i + 1 >= args.length) usage(`${arg} needs a value`)
    return args[++i]
  }
  if (arg === `--url`) url = value()
  else if (arg === `--sse`) sse = true
  else if (arg === `--until-offset`) untilOffset = value()
  else if (arg === `--log`) log = value()
  else if (arg === `--offset`) offset = value()
  else if (arg === `--param` || arg === `--json-param`) {
    const p = value()
    const eq = p.indexOf(`=`)
    if (eq <= 0) usage(`${arg} wants name=value, got ${p}`)
    const v = p.slice(eq + 1)
    try {
      params[p.slice(0, eq)] = arg === `--param` ? v : JSON.parse(v)
    } catch (e) {
      usage(`${arg} ${p}: ${e}`)
    }
  } else usage(`unknown argument ${arg}`)
}
if (!url) usage(`--url is required`)
if (!params.table) usage(`--param table=… is required`)

// A value as text, the way tests/official_client.rs renders shapesync's typed values:
// NULL is null; bigint/number/boolean are their decimal or true/false text; strings as
// they are; arrays are JSON arrays of element texts (nested arrays nest); JSON objects
// are their JSON text with keys sorted. The client's default parser produced these types
// (int8 -> bigint, int2/int4/float -> number, bool -> boolean, json(b) -> object, arrays).
function element(v) {
  if (v === null || v === undefined) return null
  if (Array.isArray(v)) return v.map(element)
  return text(v)
}
function sortKeys(v) {
  if (typeof v === `bigint`) return v.toString()
  if (v === null || typeof v !== `object`) return v
  if (Array.isArray(v)) return v.map(sortKeys)
  const out = {}
  for (const k of Object.keys(v).sort()) out[k] = sortKeys(v[k])
  return out
}
function text(v) {
  if (v === null || v === undefined) return null
  if (Array.isArray(v)) return JSON.stringify(v.map(element))
  if (typeof v === `object`) return JSON.stringify(sortKeys(v))
  return String(v)
}
function row(value) {
  const out = {}
  for (const [column, v] of Object.entries(value ?? {})) out[column] = text(v)
  return out
}
function headersJson(headers) {
  return JSON.parse(JSON.stringify(headers, (_k, v) => (typeof v === `bigint` ? v.toString() : v)))
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + `\n`)
}

const rows = new Map()

// Subquery shapes: the client passes move-out/move-in events through to subscribers and
// leaves materialising them to the application, so this does it, as Electric's own
// materializer does (sync-service shapes/consumer/materializer.ex): each change's `tags`
// (one per disjunct of the where's DNF, `/`-separated slots per position, an empty slot is
// a position the disjunct does not use) and `active_conditions` (per position). A move-out
// sets the matched positions inactive (without active_conditions: drops the matched tags);
// a row stays while some tag has all its used positions active (or some tag remains). A
// move-in reactivates positions; the rows it brings arrive as inserts.
const tagsOf = new Map()
const slotsMatch = (tag, p) => tag.split(`/`)[p.pos] === p.value
function included(entry) {
  if (!entry.active) return entry.tags.length > 0
  return entry.tags.some((t) => t.split(`/`).every((slot, pos) => slot === `` || entry.active[pos]))
}
function moveEvent(event, patterns) {
  const deleted = []
  for (const [key, entry] of tagsOf) {
    const matched = patterns.filter((p) => entry.tags.some((t) => slotsMatch(t, p)))
    if (matched.length === 0) continue
    if (entry.active) {
      for (const p of matched) entry.active[p.pos] = event === `move-in`
    } else if (event === `move-out`) {
      entry.tags = entry.tags.filter((t) => !matched.some((p) => slotsMatch(t, p)))
    }
    if (event === `move-out` && !included(entry)) {
      tagsOf.delete(key)
      rows.delete(key)
      deleted.push(key)
    }
  }
  return deleted
}
let finished = false
function finish(code) {
  if (finished) return
  finished = true
  aborter.abort()
  emit({ type: `rows`, rows: Object.fromEntries(rows) })
  // Let stdout drain before exiting.
  process.stdout.write(``, () => process.exit(code))
}

// FOLLOW_DEBUG=1: log each request, its status and when its body ends, on stderr.
const debug = process.env.FOLLOW_DEBUG ? (...a) => process.stderr.write(`${Date.now() % 100000} ${a.join(` `)}\n`) : null
const fetchClient = debug
  ? async (input, init) => {
      const u = new URL(String(input))
      const tag = `${u.searchParams.get(`offset`)}${u.searchParams.has(`live_sse`) ? ` sse` : ``}`
      debug(`-> ${tag}`)
      init?.signal?.addEventListener(`abort`, () => debug(`abort ${tag} ${init.signal.reason}`))
      const res = await fetch(input, init)
      debug(`<- ${tag} ${res.status} ${res.headers.get(`electric-offset`)}`)
      if (!res.body) return res
      const body = res.body.pipeThrough(
        new TransformStream({ flush: () => debug(`end ${tag}`) })
      )
      return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers })
    }
  : undefined

const aborter = new AbortController()
const stream = new ShapeStream({
  url,
  params,
  ...(fetchClient ? { fetchClient } : {}),
  ...(log ? { log } : {}),
  ...(offset ? { offset } : {}),
  liveSse: sse,
  signal: aborter.signal,
  // The client retries 5xx, 429 and network errors itself, but a 200 whose body is cut
  // off (fetch.ts `consumeResponseBody`: FetchError with the 200's status) reaches onError,
  // and stops the stream unless onError asks for a retry: as its docs say to, retry what is
  // transient and stop on the rest (4xx).
  onError: (error) => {
    if (finished) return
    const status = error instanceof FetchError ? error.status : undefined
    if (error instanceof FetchError && (status < 300 || status >= 500 || status === 429)) {
      emit({ type: `retry`, status, message: String(error.message) })
      return {}
    }
    emit({ type: `error`, message: String(error?.stack ?? error) })
    finished = true
    process.stdout.write(``, () => process.exit(1))
  },
})

stream.subscribe(
  (messages) => {
    if (finished) return
    const out = []
    let upToDate = false
    for (const m of messages) {
      if (isChangeMessage(m)) {
        const op = m.headers.operation
        const value = row(m.value)
        const lsn = m.headers.lsn ?? null
        const opPosition = m.headers.op_position ?? null
        const change = { kind: `change`, op, key: m.key, value, lsn, op_position: opPosition }
        if (m.old_value) change.old_value = row(m.old_value)
        out.push(change)
        if (op === `insert`) rows.set(m.key, value)
        else if (op === `update`) rows.set(m.key, { ...(rows.get(m.key) ?? {}), ...value })
        else if (op === `delete`) rows.delete(m.key)
        if (op === `delete`) tagsOf.delete(m.key)
        else if (Array.isArray(m.headers.tags)) {
          const active = m.headers.active_conditions
          tagsOf.set(m.key, { tags: [...m.headers.tags], active: Array.isArray(active) ? [...active] : null })
        }
      } else if (isControlMessage(m)) {
        const { control, ...rest } = headersJson(m.headers)
        out.push({ kind: `control`, control, ...rest })
        if (control === `must-refetch`) {
          rows.clear()
          tagsOf.clear()
        }
        if (control === `up-to-date`) upToDate = true
      } else if (m?.headers?.event) {
        const { event, ...rest } = headersJson(m.headers)
        const deleted = moveEvent(event, Array.isArray(m.headers.patterns) ? m.headers.patterns : [])
        out.push({ kind: `event`, event, ...rest, deleted })
      } else {
        out.push({ kind: `unknown`, message: headersJson(m) })
      }
    }
    emit({ type: `batch`, handle: stream.shapeHandle ?? null, offset: stream.lastOffset, messages: out })
    if (upToDate && untilOffset !== undefined && stream.lastOffset === untilOffset) finish(0)
  },
  (error) => {
    if (finished) return
    emit({ type: `error`, message: String(error?.stack ?? error) })
    finished = true
    process.stdout.write(``, () => process.exit(1))
  }
)

process.stdin.on(`data`, () => {})
process.stdin.on(`end`, () => finish(0))
process.stdin.on(`error`, () => finish(0))
process.stdin.resume()
