(function(){
var D=JSON.parse(document.getElementById('data').textContent), P=document.getElementById('panel'), pinned=null;
var CLS=['unshifted','reranked','shifted'];
function vis(s){return s===''?'\u2205':s.replace(/ /g,'\u2423').replace(/\n/g,'\u21b5').replace(/\t/g,'\u21e5').replace(/\r/g,'\u240d');}
function tx(i){return i===null?'?':(Object.prototype.hasOwnProperty.call(D.vocab,i)?vis(D.vocab[i]):'\u27e8id='+i+'\u27e9');}
function f(x,d){return x===null?'n/a':Number(x).toPrecision(d||3);}
function pad(s,n){s=String(s); if(s.length>n)s=s.slice(0,n-1)+'\u2026'; while(s.length<n)s+=' '; return s;}
function top(ids,ps,emitted){return ids.map(function(i,r){
  return (i===emitted?'*':' ')+(r+1)+' '+pad(tx(i),12)+' '+Number(ps[r]).toFixed(3);});}
function show(el){
  var t=D.traj[+el.dataset.t], j=+el.dataset.p, h=t.H[j];
  var L=[t.source+' trajectory #'+t.index+', position '+j+': '+CLS[t.cls[j]],
    'token             '+tx(t.ids[j]),
    'base entropy      '+f(h)+' nats'+(h===null?'':' ('+f(h*1.4427)+' bits)'),
    'base argmax       '+tx(t.ba[j]),
    'tuned argmax      '+tx(t.ta[j])+'   (base rank '+t.rank[j]+')',
    'KL(base||tuned)   '+f(t.kl[j])+' nats', 'KL(tuned||base)   '+f(t.rkl[j])+' nats', 'JS                '+f(t.js[j])+' nats'];
  if(t.bt&&t.bt[j]&&t.tt&&t.tt[j]){
    var b=top(t.bt[j],t.bp[j],t.ids[j]), u=top(t.tt[j],t.tp[j],t.ids[j]);
    L.push('', pad('base top-'+b.length+' (p)',24)+'tuned top-'+u.length+' (p)');
    for(var r=0;r<Math.max(b.length,u.length);r++)L.push(pad(b[r]||'',24)+(u[r]||''));
    L.push('* = the token emitted here');
  } else L.push(D.note);
  P.textContent=L.join('\n');
}
document.addEventListener('mouseover',function(e){var el=e.target.closest('span.tok'); if(el&&pinned===null)show(el);});
document.addEventListener('click',function(e){
  var el=e.target.closest('span.tok'); if(!el)return;
  if(pinned)pinned.classList.remove('sel');
  if(pinned===el){pinned=null;return;}
  pinned=el; el.classList.add('sel'); show(el);
});
document.body.dataset.ready='1';
})();
