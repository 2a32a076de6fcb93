/** The simulator's agenda: a binary min-heap on (time, insertion order), so events at one instant run in the order they were scheduled. */
export class EventQueue<T> {
  private times: number[] = [];
  private seqs: number[] = [];
  private items: T[] = [];
  private seq = 0;

  constructor(private readonly max: number) {}

  get size(): number {
    return this.items.length;
  }

  push(t: number, item: T): void {
    if (this.items.length >= this.max) throw new Error(`simulator agenda over ${this.max} events`);
    const { times, seqs, items } = this;
    let i = items.length;
    times.push(t);
    seqs.push(this.seq++);
    items.push(item);
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.less(i, p)) break;
      this.swap(i, p);
      i = p;
    }
  }

  /** Time of the next event (Infinity when empty). */
  peekTime(): number {
    return this.items.length ? this.times[0] : Infinity;
  }

  pop(): T | undefined {
    const { times, seqs, items } = this;
    if (!items.length) return undefined;
    const top = items[0];
    const last = items.length - 1;
    this.swap(0, last);
    times.pop();
    seqs.pop();
    items.pop();
    let i = 0;
    const n = items.length;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < n && this.less(l, m)) m = l;
      if (r < n && this.less(r, m)) m = r;
      if (m === i) break;
      this.swap(i, m);
      i = m;
    }
    return top;
  }

  private less(a: number, b: number): boolean {
    return this.times[a] < this.times[b] || (this.times[a] === this.times[b] && this.seqs[a] < this.seqs[b]);
  }

  private swap(a: number, b: number): void {
    const { times, seqs, items } = this;
    [times[a], times[b]] = [times[b], times[a]];
    [seqs[a], seqs[b]] = [seqs[b], seqs[a]];
    [items[a], items[b]] = [items[b], items[a]];
  }
}
